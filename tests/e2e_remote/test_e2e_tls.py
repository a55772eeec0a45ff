"""A TLS registry with a custom CA, end to end (containerd, snapshotter, nydusd-py).

containerd is given the CA with ``rpull --tlscacert`` for its own fetch of manifest and bootstrap;
what is tested is how the daemon's blob reads learn it: the template's ``ca_cert_files``, a
hosts.toml ``ca`` under ``[remote.mirrors_config] dir``, or ``[remote] skip_ssl_verify``. With
none of these the daemon refuses the server and the container's read fails with EIO.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_remote_helpers import Scenario, Stack, md5, push_nydus, source_file, template
from remote_helpers import Pki

from nydus_core.testing.services import Registry

pytestmark = pytest.mark.containerd


@pytest.fixture(scope="module")
def tls_ref(busybox_image: str, tls_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("tls-push")
    return push_nydus(busybox_image, tls_registry.host, tmp, "--source-insecure", "--target-insecure")


def _read(sc: Scenario, ref: str, ca: Path) -> tuple[int, str]:
    # ctr speaks plain http to a loopback registry unless a hosts.toml says https (containerd 1.6).
    host = ref.split("/", 1)[0]
    ctr_hosts = sc.snapshotter.workdir / "ctr-hosts"
    (ctr_hosts / host).mkdir(parents=True, exist_ok=True)
    (ctr_hosts / host / "hosts.toml").write_text(f'server = "https://{host}"\n'
                                                 f'[host."https://{host}"]\n  ca = "{ca}"\n')  # fmt: skip
    sc.rpull(ref, "--hosts-dir", str(ctr_hosts))
    proc = sc.run(ref, "busybox", "md5sum", "/data/random.bin", timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def test_custom_ca_in_daemon_config(stack: Stack, tls_ref: str, e2e_pki: Pki, busybox_image: str,
                                    registry: Registry) -> None:  # fmt: skip
    want = md5(source_file(registry.url, busybox_image, "/data/random.bin"))
    with stack.scenario("tlsca", template("https", ca_cert_files=[str(e2e_pki.ca.cert)])) as sc:
        rc, out = _read(sc, tls_ref, e2e_pki.ca.cert)
        assert rc == 0 and out.split()[0] == want, out + sc.logs()[-3000:]


def test_without_the_ca_the_registry_is_refused(stack: Stack, tls_ref: str, tls_registry: Registry,
                                                e2e_pki: Pki) -> None:  # fmt: skip
    with stack.scenario("tlsnoca", template("https")) as sc:
        rc, out = _read(sc, tls_ref, e2e_pki.ca.cert)
        logs = sc.logs()
    assert rc != 0 and "input/output error" in out, out
    assert f"TLS verification of {tls_registry.host} failed" in logs, logs[-3000:]


def test_custom_ca_from_hosts_toml(stack: Stack, tls_ref: str, tls_registry: Registry, e2e_pki: Pki,
                                   tmp_path: Path) -> None:  # fmt: skip
    """containerd's hosts.toml layout: ``<dir>/<host>_<port>_/hosts.toml`` with the server's ``ca``."""
    host, port = tls_registry.host.rsplit(":", 1)
    conf = tmp_path / "certs.d" / f"{host}_{port}_"
    conf.mkdir(parents=True)
    (conf / "ca.pem").write_bytes(e2e_pki.ca.cert.read_bytes())
    (conf / "hosts.toml").write_text(f'server = "https://{tls_registry.host}"\n'
                                     f'[host."https://{tls_registry.host}"]\n  ca = "ca.pem"\n')  # fmt: skip
    toml = f'[remote.mirrors_config]\ndir = "{tmp_path / "certs.d"}"\n'
    with stack.scenario("tlshosts", template("https"), toml=toml) as sc:
        rc, out = _read(sc, tls_ref, e2e_pki.ca.cert)
        assert rc == 0, out + sc.logs()[-3000:]


def test_skip_ssl_verify(stack: Stack, tls_ref: str, e2e_pki: Pki) -> None:
    with stack.scenario("tlsskip", template("https"), toml="[remote]\nskip_ssl_verify = true\n") as sc:
        rc, out = _read(sc, tls_ref, e2e_pki.ca.cert)
        assert rc == 0, out + sc.logs()[-3000:]
