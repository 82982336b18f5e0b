"""Stage `critique`: the SL-CAI critique-and-revise loop, cleaning of its text, its outputs
(revision records, SFT examples, preference pairs). Entry: `critique.revise.run`."""
