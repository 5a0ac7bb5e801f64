"""Reading and writing runs: local folders and S3 through one pyarrow filesystem interface."""
