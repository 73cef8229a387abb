"""The python-backend models of a Triton repository (deploy.triton_repo copies each into
`<model>/1/model.py`). They run inside Triton's python stub, which imports
`triton_python_backend_utils` and, through our interpreter's environment, this package."""
