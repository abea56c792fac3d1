"""Lab code: stand-in artifacts, test servers, attacks and sweeps for tests and benches. Not installed with the
product (pyproject includes only guard, training, serve, guardcli); tests and bench scripts import it from the
repo root."""
