"""Where and in what order structures run: chunks, claims on job folders, the Dask runner."""
