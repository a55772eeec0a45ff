"""OCI distribution client: auth, mirrors, range reads, retries."""
