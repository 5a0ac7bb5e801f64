"""The `rayq` command line."""
