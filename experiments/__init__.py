"""Study runners: one folder per study (configs, the runner chaining library calls, a README)."""
