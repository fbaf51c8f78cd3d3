"""TLS, mutual TLS and bearer tokens on the gateway's gRPC port: real stacks (`inflight
serve`, on the engine double since no test here needs the model) with certificates made
here, and clients that dial them as a user would."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from inflight.client import Client, channel_credentials
from inflight.v1 import pb
from testing.stack import ROOT, Stack

DOUBLE = {"INFLIGHT_ENGINE": "testing.engine_double:InstantEngine", "INFLIGHT_SERVED_MODEL_NAME": "double"}
TOKENS = ["first-token-3f9a", "second-token-77c1"]


def make_ca(folder: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = _builder(subject, subject, key).add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True) \
        .sign(key, hashes.SHA256())
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def make_leaf(folder: Path, name: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    """name.pem and name.key, signed by ca, for localhost and 127.0.0.1, as server or client."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (_builder(subject, ca[0].subject, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca[1], hashes.SHA256()))
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))


def _builder(subject: x509.Name, issuer: x509.Name, key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)))


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """server-ca signs the server; client-ca signs alice (let in under mutual TLS); other-ca
    signs mallory (not let in) and is the wrong CA to trust for the server."""
    d = tmp_path_factory.mktemp("certs")
    make_leaf(d, "server", make_ca(d, "server-ca"))
    make_leaf(d, "alice", make_ca(d, "client-ca"))
    make_leaf(d, "mallory", make_ca(d, "other-ca"))
    (d / "tokens").write_text("\n".join(TOKENS) + "\n\n")
    return d


@pytest.fixture(scope="module")
def stacks(certs):
    """Two stacks, started side by side: TLS with bearer tokens, and mutual TLS."""
    server = ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")]
    configs = {"tls_token": server + ["--auth-token-file", str(certs / "tokens")],
               "mtls": server + ["--tls-client-ca", str(certs / "client-ca.pem")]}
    with ThreadPoolExecutor(len(configs)) as pool:
        futures = {name: pool.submit(Stack, env=DOUBLE, extra=extra) for name, extra in configs.items()}
        started = {name: f.result() for name, f in futures.items()}
    yield started
    for s in started.values():
        s.stop_later()  # nothing looks at them again: they end while the next tests run


def run(coro):
    return asyncio.run(coro)


async def generate(client: Client) -> list:
    return [part async for part in client.generate(text="Hi", max_tokens=2)]


CALLS = {
    "Generate": generate,
    "Complete": lambda c: c.complete(text="Hi", max_tokens=2),
    "Tokenize": lambda c: c.stub.Tokenize(pb.TokenizeRequest(text="Hi"), metadata=c.metadata, timeout=10),
    "Detokenize": lambda c: c.stub.Detokenize(pb.DetokenizeRequest(token_ids=[260]), metadata=c.metadata, timeout=10),
    "ListModels": lambda c: c.stub.ListModels(pb.ListModelsRequest(), metadata=c.metadata, timeout=10),
}


async def code_of(call, client_args: dict) -> grpc.StatusCode:
    async with Client(**client_args) as client:
        try:
            await asyncio.wait_for(call(client), 20)
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_tls_serves_a_client_that_trusts_its_ca(stacks, certs):
    async def go():
        async with Client(stacks["tls_token"].target, root_ca=str(certs / "server-ca.pem"), token=TOKENS[0]) as client:
            return await client.complete(text="Hi", max_tokens=2)

    assert run(go()).finished.usage.completion_tokens == 2


@pytest.mark.parametrize("root_ca", [None, "other-ca.pem"], ids=["plaintext", "wrong-ca"])
def test_tls_refuses_plaintext_and_a_client_that_trusts_another_ca(stacks, certs, root_ca):
    args = {"target": stacks["tls_token"].target, "token": TOKENS[0], "root_ca": str(certs / root_ca) if root_ca else None}
    assert run(code_of(CALLS["Complete"], args)) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("method", CALLS)
def test_every_inference_method_needs_a_token(stacks, certs, method):
    tls = {"target": stacks["tls_token"].target, "root_ca": str(certs / "server-ca.pem")}
    assert run(code_of(CALLS[method], tls)) == grpc.StatusCode.UNAUTHENTICATED
    assert run(code_of(CALLS[method], {**tls, "token": "not-" + TOKENS[0]})) == grpc.StatusCode.UNAUTHENTICATED
    assert run(code_of(CALLS[method], {**tls, "metadata": [("authorization", f"Basic {TOKENS[0]}")]})) == grpc.StatusCode.UNAUTHENTICATED
    for token in TOKENS:  # every line of the file is a token
        assert run(code_of(CALLS[method], {**tls, "token": token})) == grpc.StatusCode.OK


def test_the_refusal_says_what_is_missing(stacks, certs):
    async def go():
        async with Client(stacks["tls_token"].target, root_ca=str(certs / "server-ca.pem")) as client:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await generate(client)
        return e.value.details()

    assert "authorization: Bearer <token>" in run(go())


def test_health_and_reflection_need_no_token(stacks, certs):
    creds = channel_credentials(str(certs / "server-ca.pem"))
    with grpc.secure_channel(stacks["tls_token"].target, creds) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="inflight.v1.Inference"), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        assert "inflight.v1.Inference" in [s.name for r in responses for s in r.list_services_response.service]


def test_gateway_http_endpoints_listen_on_loopback_only(stacks):
    port = stacks["tls_token"].http_port("gateway")
    listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:] if line.split()[3] == "0A"]
    assert f"0100007F:{port:04X}" in listening  # 127.0.0.1, little-endian
    assert f"00000000:{port:04X}" not in listening
    assert stacks["tls_token"].http_get("gateway", "/ready")[0] == 200


@pytest.mark.parametrize("client_cert, expected", [(None, grpc.StatusCode.UNAVAILABLE), ("mallory", grpc.StatusCode.UNAVAILABLE),
                                                   ("alice", grpc.StatusCode.OK)], ids=["no-cert", "other-ca", "client-ca"])
def test_mutual_tls_lets_in_only_certificates_from_the_client_ca(stacks, certs, client_cert, expected):
    args = {"target": stacks["mtls"].target, "root_ca": str(certs / "server-ca.pem")}
    if client_cert:
        args |= {"cert": str(certs / f"{client_cert}.pem"), "key": str(certs / f"{client_cert}.key")}
    assert run(code_of(CALLS["Complete"], args)) == expected
    assert run(code_of(CALLS["Generate"], args)) == expected


def test_chat_over_mutual_tls(stacks, certs):
    cmd = [sys.executable, "-m", "cli", "chat", "--target", stacks["mtls"].target, "--max-tokens", "3",
           "--tls-ca", str(certs / "server-ca.pem"), "--tls-cert", str(certs / "alice.pem"), "--tls-key", str(certs / "alice.key"), "Hi"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    without_cert = subprocess.run(cmd[:-5] + ["Hi"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert without_cert.returncode == 1 and "UNAVAILABLE" in without_cert.stderr


def test_a_missing_certificate_stops_the_gateway_with_one_line(certs):
    cmd = [sys.executable, "-m", "cli", "gateway", "--listen", "127.0.0.1:0", "--metrics-port", "0",
           "--tls-cert", str(certs / "nothing.pem"), "--tls-key", str(certs / "server.key")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [f"error: --tls-cert {certs}/nothing.pem: No such file or directory"]


@pytest.mark.parametrize("fields, says", [
    ({"tls_cert": "server.pem", "tls_key": "alice.key"}, "--tls-key {d}/alice.key is not the key of the certificate in --tls-cert"),
    ({"tls_cert": "server.key", "tls_key": "server.key"}, "--tls-cert {d}/server.key: no PEM certificate in it"),
    ({"tls_cert": "server.pem", "tls_key": "server.pem"}, "--tls-key {d}/server.pem: no PEM private key in it"),
    ({"tls_cert": "server.pem"}, "TLS needs both --tls-cert and --tls-key"),
    ({"tls_client_ca": "client-ca.pem"}, "TLS needs both --tls-cert and --tls-key"),
    ({"tls_cert": "server.pem", "tls_key": "server.key", "tls_client_ca": "server.key"}, "--tls-client-ca {d}/server.key: no usable PEM CA"),
    ({"tls_cert": "server.pem", "tls_key": "server.key", "tls_client_ca": "nothing.pem"}, "--tls-client-ca {d}/nothing.pem: No such file"),
], ids=["wrong-key", "key-as-cert", "cert-as-key", "no-key", "client-ca-alone", "bad-client-ca", "missing-client-ca"])
def test_unusable_tls_files_are_named(certs, fields, says):
    from gateway.main import TlsConfig, server_credentials

    with pytest.raises(SystemExit) as e:
        server_credentials(TlsConfig(**{k.removeprefix("tls_"): str(certs / v) for k, v in fields.items()}))
    assert str(e.value).startswith("error: " + says.format(d=certs))


@pytest.mark.parametrize("text, says", [(None, "No such file or directory"), ("\n \n", "no token in it"),
                                        ("a b\n", "a token holds a space")], ids=["missing", "empty", "space"])
def test_unusable_token_files_are_named(tmp_path, text, says):
    from gateway.main import GatewayConfig, bearer_tokens

    if text is not None:
        (tmp_path / "tokens").write_text(text)
    with pytest.raises(SystemExit) as e:
        bearer_tokens(GatewayConfig(auth_token_file=str(tmp_path / "tokens")))
    assert str(e.value).startswith(f"error: --auth-token-file {tmp_path}/tokens: {says}")


def test_the_openai_http_api_has_the_same_tls_tokens_and_client_certificates(stacks, certs):
    import ssl

    import openai

    def client(stack, token="unused", cert: str | None = None, ca="server-ca.pem") -> openai.OpenAI:
        ctx = ssl.create_default_context(cafile=str(certs / ca))
        if cert:
            ctx.load_cert_chain(str(certs / f"{cert}.pem"), str(certs / f"{cert}.key"))
        return openai.OpenAI(base_url=f"https://{stack.http_target}/v1", api_key=token, max_retries=0, timeout=20,
                             http_client=openai.DefaultHttpxClient(verify=ctx))

    def complete(c: openai.OpenAI) -> int:
        return c.completions.create(model="double", prompt="Hi", max_tokens=2).usage.completion_tokens

    tls = stacks["tls_token"]
    for token in TOKENS:
        assert complete(client(tls, token)) == 2
    for token in ("unused", "not-" + TOKENS[0]):
        with pytest.raises(openai.AuthenticationError) as e:
            complete(client(tls, token))
        assert e.value.status_code == 401 and "bearer token" in e.value.body["message"]
    with pytest.raises(openai.APIConnectionError):  # a client that trusts another CA
        complete(client(tls, TOKENS[0], ca="other-ca.pem"))
    mtls = stacks["mtls"]
    assert complete(client(mtls, cert="alice")) == 2
    for cert in (None, "mallory"):
        with pytest.raises(openai.APIConnectionError):
            complete(client(mtls, cert=cert))
