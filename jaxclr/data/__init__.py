"""Host-side input pipelines (see input_pipeline.py for the contract)."""
