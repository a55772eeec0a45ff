"""OCI distribution client: references, auth, mirrors, ranged reads, retries, pushes.

Entry points: `RegistryClient` (one repository on one registry), `client_from_backend_config`
(from nydusd's ``device.backend.config``), the mirror readers in `mirrors`, and the credential
providers in `auth` (labels, docker config) and `backend` (the ``nydus_credentials`` hook).
"""
