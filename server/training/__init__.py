"""Training: prefix tuning (Li & Liang 2021) and the job queue / worker that runs it."""
