"""Engine: request intake, the schedule -> execute -> update step, detokenization."""
