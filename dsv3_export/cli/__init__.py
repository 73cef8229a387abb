"""The `dsv3-export` command line, thin over the Python API."""
