"""Stage `eval`: generate answers, count refusals (phrase rule and judge), judge win rates,
compute the statistics and write the report. Entry: `critique.evaluate.run`."""
