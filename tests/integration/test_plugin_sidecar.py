"""out_auditrelay.so, driven like Fluent Bit's Go proxy, against the real sidecar (`auditrelay serve`).

Every test loads the plugin built from this checkout (auditrelay.devtools.flbproxy) and runs the
sidecar as a subprocess on a Unix socket (or TCP with mTLS), awaiting it through grpc.health.v1.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from auditrelay.config import BUNDLED_POLICY
from auditrelay.deadletter import payload_of, read_letters
from auditrelay.devtools.flbproxy import (
    FLUENT_BIT_4_2_8,
    FLUENT_BIT_5_1_1,
    FluentBitVersion,
    GoProxy,
    InitError,
    Instance,
    Level,
    Result,
)
from auditrelay.spool import summarize
from fixtures.certs import make_pki
from fixtures.chunks import (
    TAIL_CHUNK_PARSED,
    TAIL_CHUNK_RAW_LOG,
    kept_by_policy,
    sample_lines,
    tail_chunk,
)
from harness.sidecar import Sidecar, free_port

TAG = "kube.audit"
SidecarFactory = Callable[..., Sidecar]


@pytest.fixture
def make_sidecar(workdir: Path) -> Iterator[SidecarFactory]:
    """Makes (not starts) sidecars in workdir; every one is stopped after the test."""
    made: list[Sidecar] = []

    def make(*extra_args: str, name: str = "relay") -> Sidecar:
        sidecar = Sidecar.on_socket(workdir / f"{name}.sock", workdir / name, extra_args)
        made.append(sidecar)
        return sidecar

    yield make
    for sidecar in made:
        sidecar.stop()


@pytest.fixture
def sidecar(make_sidecar: SidecarFactory) -> Sidecar:
    """A running sidecar with default settings."""
    started = make_sidecar()
    started.start()
    return started


@pytest.fixture
def proxy_for(plugin_path: Path) -> Iterator[Callable[[FluentBitVersion], GoProxy]]:
    """Makes a registered GoProxy for a Fluent Bit version; each is shut down after the test."""
    made: list[GoProxy] = []

    def make(version: FluentBitVersion) -> GoProxy:
        proxy = GoProxy(plugin_path, version)
        proxy.register()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        if proxy.registration is not None:
            proxy.shutdown()


@pytest.fixture
def proxy(proxy_for: Callable[[FluentBitVersion], GoProxy]) -> GoProxy:
    """The plugin registered with Fluent Bit 5.1.1."""
    return proxy_for(FLUENT_BIT_5_1_1)


def section(sidecar: Sidecar, **properties: str) -> dict[str, str]:
    """An [OUTPUT] section (its non-core keys) pointing at sidecar."""
    return {"sidecar_address": sidecar.address, "sidecar_wait": "20s", **properties}


def undelivering_section(sidecar: Sidecar, **properties: str) -> dict[str, str]:
    """A section whose workspace and Entra endpoints are unreachable: nothing is delivered, so
    the spool keeps (and shows) everything stored."""
    unreachable = "https://127.0.0.1:1"
    return section(
        sidecar,
        endpoint=unreachable,
        dcr_id="dcr-" + "0" * 32,
        auth="client_secret",
        authority_host=unreachable,
        tenant_id="tenant",
        client_id="client",
        client_secret="not-a-real-secret",
        **properties,
    )


def pipeline_of(proxy: GoProxy, instance: Instance) -> str:
    """The pipeline id the plugin logged when it connected."""
    prefix = f"[output:auditrelay:auditrelay.{instance.number}] connected to the sidecar at "
    for line in proxy.lines(Level.INFO):
        if line.startswith(prefix):
            return line.rsplit("pipeline ", 1)[1]
    raise AssertionError(f"no connected line for instance {instance.number}: {proxy.lines()}")


def flush_until_ok(
    proxy: GoProxy, instance: Instance, chunk: bytes, seconds: float
) -> list[Result]:
    """Flushes the same chunk, as Fluent Bit's retries would, until OK or the deadline."""
    results: list[Result] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        results.append(proxy.flush(instance, chunk, TAG))
        if results[-1] is Result.OK:
            return results
    return results


# --- configuration --------------------------------------------------------------------------


def test_properties_reach_the_sidecar(proxy: GoProxy, sidecar: Sidecar) -> None:
    """Configure carries every property set in the section, the instance name and the version;
    a secret's value appears in neither log."""
    proxy.init(
        section(sidecar, stream="Custom-Audit_CL", cluster_name="prod", client_secret="s3cr3t")
    )
    [configured] = sidecar.events("pipeline_configured")
    assert "auditrelay.0" == configured["instance_name"]
    assert "0.1.0" == configured["plugin_version"]
    assert [
        "client_secret",
        "cluster_name",
        "sidecar_address",
        "sidecar_wait",
        "stream",
    ] == configured["properties"]
    assert "s3cr3t" not in sidecar.log_text()
    assert not any("s3cr3t" in line for line in proxy.lines())


def test_misconfigured_pipeline_fails_init_with_the_property_error(
    proxy: GoProxy, sidecar: Sidecar
) -> None:
    """A value the sidecar refuses makes init fail, and Fluent Bit's log says which and why."""
    with pytest.raises(InitError) as raised:
        proxy.init(section(sidecar, stream="Audit"))
    [line] = [entry.text for entry in raised.value.log if entry.level is Level.ERROR]
    assert line.startswith(
        "[output:auditrelay:auditrelay.0] the sidecar rejected the configuration: "
        "property 'stream' = 'Audit': expected a custom stream name"
    )


def test_misconfigured_plugin_property_fails_init_without_the_sidecar(proxy: GoProxy) -> None:
    """A bad plugin property fails init at once, naming the property, value and expectation."""
    with pytest.raises(InitError) as raised:
        proxy.init({"sidecar_address": "relay.sock"})
    assert [
        "[output:auditrelay:auditrelay.0] invalid configuration: property 'sidecar_address' = "
        "'relay.sock': expected unix:///absolute/path.sock or host:port"
    ] == [entry.text for entry in raised.value.log]


def test_older_fluent_bit_ignores_a_misspelled_key(
    proxy_for: Callable[[FluentBitVersion], GoProxy], sidecar: Sidecar
) -> None:
    """Without a config map (Fluent Bit < 5.1.1) a misspelled key is never read: init succeeds
    with the default, and the sidecar never hears of the key (documented in docs/plugin.md)."""
    proxy = proxy_for(FLUENT_BIT_4_2_8)
    proxy.init(section(sidecar, strem="Custom-Other_CL"))
    [configured] = sidecar.events("pipeline_configured")
    assert ["sidecar_address", "sidecar_wait"] == configured["properties"]


# --- chunks and replies ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunk_file", [TAIL_CHUNK_PARSED, TAIL_CHUNK_RAW_LOG], ids=lambda p: p.name
)
def test_a_real_chunk_is_accepted_whole(proxy: GoProxy, sidecar: Sidecar, chunk_file: Path) -> None:
    """A Fluent Bit flush of a real kube-apiserver log arrives whole and is accepted: every record
    is an audit event, those the bundled policy keeps are accepted and the others filtered."""
    chunk = tail_chunk(chunk_file)
    events = len(sample_lines())
    kept = kept_by_policy(BUNDLED_POLICY, sample_lines())
    instance = proxy.init(section(sidecar), log_level=Level.DEBUG)
    assert Result.OK == proxy.flush(instance, chunk, TAG)
    assert (
        f"[output:auditrelay:auditrelay.0] chunk accepted: tag={TAG} bytes={len(chunk)} "
        f"events={events} accepted={kept} filtered={events - kept} invalid=0"
    ) in proxy.lines(Level.DEBUG)
    [accepted] = sidecar.events("chunk_accepted")
    assert (len(chunk), events, 0, TAG) == (
        accepted["bytes"],
        accepted["events_received"],
        accepted["events_invalid"],
        accepted["tag"],
    )


def test_a_chunk_arrives_byte_for_byte(proxy: GoProxy, sidecar: Sidecar) -> None:
    """The plugin forwards the flush buffer unchanged, NUL and non-UTF-8 bytes included: a chunk
    that is not an event stream is set aside whole, and the dead letter holds the same bytes."""
    chunk = bytes(range(256)) * 64
    instance = proxy.init(section(sidecar))
    assert Result.OK == proxy.flush(instance, chunk, TAG)
    letters_dir = sidecar.state_dir / "deadletter" / pipeline_of(proxy, instance)
    letters = [
        letter for path in sorted(letters_dir.glob("*.jsonl")) for letter in read_letters(path)
    ]
    assert [("not_msgpack", TAG, chunk)] == [
        (letter["reason"], letter["tag"], payload_of(letter)) for letter in letters
    ]


def test_spool_full_is_a_retry(proxy: GoProxy, sidecar: Sidecar) -> None:
    """RETRY_LATER (the pipeline cannot take more) maps to FLB_RETRY: Fluent Bit keeps the chunk."""
    instance = proxy.init(undelivering_section(sidecar, spool_limit="1k"))
    # An empty spool takes one chunk over its limit (else that chunk would be refused forever);
    # the next one has to wait. (The same chunk again would be OK: its rows are stored.)
    assert Result.OK == proxy.flush(instance, tail_chunk(TAIL_CHUNK_PARSED), TAG)
    chunk = tail_chunk(TAIL_CHUNK_RAW_LOG)
    assert Result.RETRY == proxy.flush(instance, chunk, TAG)
    [line] = proxy.lines(Level.WARN)
    assert line.startswith(
        f"[output:auditrelay:auditrelay.0] chunk retried: tag={TAG} bytes={len(chunk)}: RETRY_LATER: spool: "
    )


def test_a_chunk_sent_again_is_stored_once(proxy: GoProxy, sidecar: Sidecar) -> None:
    """Fluent Bit sends a chunk again when it never got the answer (the sidecar was killed
    after storing it): the same bytes under the same tag are answered OK and not stored twice."""
    instance = proxy.init(undelivering_section(sidecar))
    chunk = tail_chunk(TAIL_CHUNK_PARSED)
    assert Result.OK == proxy.flush(instance, chunk, TAG)
    [spool] = [path for path in (sidecar.state_dir / "spool").iterdir() if path.is_dir()]
    stored = summarize(spool).pending_bytes
    assert Result.OK == proxy.flush(instance, chunk, TAG)
    assert stored == summarize(spool).pending_bytes
    assert 1 == len(sidecar.events("chunk_already_stored"))
    assert Result.OK == proxy.flush(instance, chunk, "other.tag")  # another tag: another chunk
    assert stored < summarize(spool).pending_bytes


def test_a_chunk_the_sidecar_can_never_take_is_an_error(
    proxy: GoProxy, make_sidecar: SidecarFactory
) -> None:
    """REJECTED (here: over the sidecar's max_chunk_bytes) maps to FLB_ERROR, with the reason."""
    sidecar = make_sidecar("--max-chunk-bytes", "64k")
    sidecar.start()
    instance = proxy.init(section(sidecar))
    chunk = tail_chunk(TAIL_CHUNK_PARSED)
    assert Result.ERROR == proxy.flush(instance, chunk, TAG)
    assert [
        f"[output:auditrelay:auditrelay.0] chunk rejected: tag={TAG} bytes={len(chunk)}: "
        f"REJECTED: chunk of {len(chunk)} bytes is over max_chunk_bytes 65536"
    ] == proxy.lines(Level.ERROR)


# --- the sidecar absent, late, slow, restarted ----------------------------------------------


def test_absent_sidecar_fails_init_after_sidecar_wait(proxy: GoProxy, workdir: Path) -> None:
    """No sidecar: init waits sidecar_wait, then fails saying where it looked and why."""
    started = time.monotonic()
    with pytest.raises(InitError) as raised:
        proxy.init({"sidecar_address": f"unix://{workdir}/none.sock", "sidecar_wait": "500ms"})
    assert time.monotonic() - started >= 0.5
    [line] = [entry.text for entry in raised.value.log]
    assert line.startswith(
        f"[output:auditrelay:auditrelay.0] the sidecar at unix://{workdir}/none.sock did not "
        "answer within sidecar_wait 500ms: DEADLINE_EXCEEDED: "
    )
    assert "no such file or directory" in line


def test_init_waits_for_a_sidecar_that_starts_late(
    proxy: GoProxy, make_sidecar: SidecarFactory
) -> None:
    """In a pod both containers start together: init waits until the sidecar is up."""
    sidecar = make_sidecar()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(proxy.init, section(sidecar))
        sidecar.start()
        instance = pending.result(timeout=30)
    assert Result.OK == proxy.flush(instance, tail_chunk(TAIL_CHUNK_RAW_LOG), TAG)


def test_hung_sidecar_costs_one_timeout_and_a_retry(proxy: GoProxy, sidecar: Sidecar) -> None:
    """A sidecar that answers nothing (stopped with SIGSTOP) makes the flush return FLB_RETRY
    once sidecar_timeout has passed; once it answers again, the chunk is accepted."""
    instance = proxy.init(section(sidecar, sidecar_timeout="500ms"))
    chunk = tail_chunk(TAIL_CHUNK_RAW_LOG)
    sidecar.pause()
    try:
        started = time.monotonic()
        assert Result.RETRY == proxy.flush(instance, chunk, TAG)
        elapsed = time.monotonic() - started
    finally:
        sidecar.resume()
    assert 0.5 <= elapsed
    assert Result.OK == proxy.flush(instance, chunk, TAG)


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_restarted_sidecar_costs_only_retries(proxy: GoProxy, sidecar: Sidecar, how: str) -> None:
    """After the sidecar restarts (gracefully or after a crash) it no longer knows the pipeline:
    the plugin configures it again by itself, and Fluent Bit sees at most retries."""
    instance = proxy.init(section(sidecar))
    chunk = tail_chunk(TAIL_CHUNK_RAW_LOG)
    assert Result.OK == proxy.flush(instance, chunk, TAG)
    getattr(sidecar, how)()
    sidecar.start()
    results = flush_until_ok(proxy, instance, chunk, seconds=20)
    assert Result.OK == results[-1]
    assert {Result.OK, Result.RETRY} >= set(results)
    pipeline = pipeline_of(proxy, instance)
    assert (
        f"[output:auditrelay:auditrelay.0] pipeline {pipeline} configured again after a "
        "sidecar restart"
    ) in proxy.lines(Level.INFO), (results, proxy.lines(), sidecar.log_text()[-6000:])
    assert [pipeline] == [event["pipeline_id"] for event in sidecar.events("pipeline_configured")][
        -1:
    ]


# --- several instances, several threads, hot reload -----------------------------------------


def test_two_instances_have_their_own_pipelines(proxy: GoProxy, sidecar: Sidecar) -> None:
    """Two [OUTPUT] sections are two pipelines; each flush goes to its own."""
    first = proxy.init(section(sidecar, stream="Custom-First_CL"))
    second = proxy.init(section(sidecar, stream="Custom-Second_CL"))
    assert Result.OK == proxy.flush(first, tail_chunk(TAIL_CHUNK_PARSED), "first")
    assert Result.OK == proxy.flush(second, tail_chunk(TAIL_CHUNK_RAW_LOG), "second")
    pipelines = {pipeline_of(proxy, first): "first", pipeline_of(proxy, second): "second"}
    assert 2 == len(pipelines)
    assert pipelines == {
        event["pipeline_id"]: event["tag"] for event in sidecar.events("chunk_accepted")
    }


def test_concurrent_flushes_from_worker_threads(proxy: GoProxy, sidecar: Sidecar) -> None:
    """With `workers`, Fluent Bit flushes one instance on several threads at once (ctypes drops
    the GIL for each call): every flush of two instances is accepted exactly once."""
    instances = [proxy.init(section(sidecar, cluster_name=name)) for name in ("a", "b")]
    chunk = tail_chunk(TAIL_CHUNK_RAW_LOG)
    jobs = [(instances[i % 2], f"worker.{i}") for i in range(48)]
    barrier = threading.Barrier(8)

    def flush(job: tuple[Instance, str]) -> Result:
        if int(job[1].split(".")[1]) < 8:
            barrier.wait(timeout=10)  # the first eight flushes start together
        return proxy.flush(job[0], chunk, job[1])

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(flush, jobs))
    assert [Result.OK] * len(jobs) == results
    accepted = sidecar.events("chunk_accepted")
    assert sorted(tag for _, tag in jobs) == sorted(event["tag"] for event in accepted)
    assert {len(sample_lines())} == {event["events_received"] for event in accepted}


def test_hot_reload_reregisters_and_keeps_working(proxy: GoProxy, sidecar: Sidecar) -> None:
    """A hot reload exits the instances (announced as a reload), registers the plugin again in
    the same process and initialises new instances, which work; names start again from 0."""
    chunk = tail_chunk(TAIL_CHUNK_RAW_LOG)
    before = proxy.init(section(sidecar))
    assert Result.OK == proxy.flush(before, chunk, TAG)
    proxy.exit(before, hot_reload=True)
    proxy.unregister()
    proxy.register(hot_reloading=True)
    after = proxy.init(section(sidecar))
    assert Result.OK == proxy.flush(after, chunk, TAG)
    connected = [line for line in proxy.lines(Level.INFO) if "connected to the sidecar" in line]
    assert 2 == len(connected)
    assert all(line.startswith("[output:auditrelay:auditrelay.0] ") for line in connected)


# --- TCP with mutual TLS --------------------------------------------------------------------


def test_tcp_with_mutual_tls(proxy: GoProxy, workdir: Path) -> None:
    """Over TCP the plugin speaks TLS, trusts sidecar_tls_ca and presents its client certificate."""
    pki = make_pki(workdir)
    address = f"127.0.0.1:{free_port()}"
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client.key.read_bytes(), pki.client.cert.read_bytes()
    )
    server_flags = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    client_ca_flag = ["--tls-client-ca", str(pki.ca)]
    sidecar = Sidecar(address, workdir / "tls", server_flags + client_ca_flag, credentials)
    sidecar.start()
    try:
        instance = proxy.init(
            {
                "sidecar_address": address,
                "sidecar_tls_ca": str(pki.ca),
                "sidecar_tls_cert": str(pki.client.cert),
                "sidecar_tls_key": str(pki.client.key),
                "sidecar_wait": "20s",
            }
        )
        assert Result.OK == proxy.flush(instance, tail_chunk(TAIL_CHUNK_RAW_LOG), TAG)
    finally:
        sidecar.stop()


def test_tcp_refuses_a_sidecar_signed_by_another_ca(proxy: GoProxy, workdir: Path) -> None:
    """A sidecar whose certificate sidecar_tls_ca did not sign is never talked to."""
    pki = make_pki(workdir)
    address = f"127.0.0.1:{free_port()}"
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client.key.read_bytes(), pki.client.cert.read_bytes()
    )
    sidecar = Sidecar(
        address,
        workdir / "tls",
        ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)],
        credentials,
    )
    sidecar.start()
    try:
        with pytest.raises(InitError) as raised:
            proxy.init(
                {
                    "sidecar_address": address,
                    "sidecar_tls_ca": str(pki.other_ca),
                    "sidecar_wait": "1s",
                }
            )
    finally:
        sidecar.stop()
    assert re.search(r"certificate signed by unknown authority", raised.value.log[0].text)
