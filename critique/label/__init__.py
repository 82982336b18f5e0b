"""Stage `label`: read response pairs, label them with AI preferences (both orders, principle
ensembles), write preference pairs and a report. Entry: `critique.label.run`."""
