"""The demo, a tiny byte-level LM, the sample data and an example task: code that uses aqgov, not part of it."""
