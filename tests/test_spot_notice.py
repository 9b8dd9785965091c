"""The cloud's preemption notice: each provider's protocol against a fake metadata service
on 127.0.0.1 that refuses what the real one refuses, and when the supervisor acts."""
import json
import logging
import time
import urllib.error
import urllib.request

import pytest

from metadata_servers import AWS_TOKEN, MetadataServer
from paddlerun.cluster import spot_notice
from paddlerun.cluster.spot_notice import MetadataError, detect_provider
from paddlerun.launcher.spot_watch import SpotWatch, resolve_provider
from paddlerun.trainer.rundir.config import ConfigError, SupervisorConfig, config_from_dict


@pytest.fixture(params=["aws", "gcp", "azure"])
def server(request):
    with MetadataServer(request.param) as s:
        yield s


def status_of(url, headers=None, method="GET"):
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


# ------------------------------------------------------------------ the fakes are strict

def test_the_fake_services_refuse_requests_without_their_header():
    with MetadataServer("aws") as aws, MetadataServer("gcp") as gcp, MetadataServer("azure") as az:
        assert status_of(f"{aws.url}/latest/meta-data/spot/instance-action") == 401
        assert status_of(f"{aws.url}/latest/api/token", method="PUT") == 400
        assert status_of(f"{aws.url}/latest/meta-data/spot/instance-action",
                         {"X-aws-ec2-metadata-token": AWS_TOKEN}) == 404
        assert status_of(f"{gcp.url}/computeMetadata/v1/instance/preempted") == 403
        assert status_of(f"{az.url}/metadata/scheduledevents?api-version=2020-07-01") == 400


# ------------------------------------------------------------------ each protocol

def test_no_notice_then_the_notice_with_its_deadline(server):
    client = spot_notice.client(server.provider, server.url)
    assert client.poll() is None
    deadline = server.give_notice(120)
    notice = client.poll()
    assert notice is not None and notice.provider == server.provider
    if server.provider == "gcp":  # no deadline in the protocol: the documented ~30 s
        assert abs(notice.deadline - (time.time() + spot_notice.GCP_NOTICE_S)) < 5
    else:  # to the second: both formats carry whole seconds
        assert abs(notice.deadline - deadline) <= 1.0
    # (the fake refuses a request without its provider's header: these went through)


def test_aws_asks_for_a_token_once_and_again_when_refused():
    with MetadataServer("aws") as server:
        client = spot_notice.client("aws", server.url)
        for _ in range(3):
            client.poll()
        puts = [r for r in server.requests if r["method"] == "PUT"]
        assert len(puts) == 1 and puts[0]["headers"]["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
        client._token = "expired"  # what an instance stop/start does to a token
        server.give_notice(100)
        assert client.poll() is not None
        assert len([r for r in server.requests if r["method"] == "PUT"]) == 2


def test_gcp_waits_in_a_long_poll_and_answers_when_the_value_changes():
    with MetadataServer("gcp") as server:
        client = spot_notice.client("gcp", server.url)
        started = time.monotonic()
        assert client.poll(wait_s=1) is None  # the server held it ~1 s: nothing changed
        assert time.monotonic() - started >= 0.9
        import threading
        threading.Timer(0.3, server.give_notice, args=(30,)).start()
        started = time.monotonic()
        notice = client.poll(wait_s=20)
        assert notice is not None and time.monotonic() - started < 10
        assert server.requests[-1]["query"]["wait_for_change"] == ["true"]


def test_azure_takes_only_this_vms_preempt_event_and_acknowledges_it():
    with MetadataServer("azure") as server:
        server.other_vm_event = True
        client = spot_notice.client("azure", server.url)
        assert client.poll() is None, "another VM's Preempt event is not ours"
        server.give_notice(45)
        notice = client.poll()
        assert notice is not None and notice.event_id == server.event_id
        client.acknowledge(notice)
        assert server.acknowledged == [server.event_id]
        post = [r for r in server.requests if r["method"] == "POST"][0]
        assert post["query"]["api-version"] == ["2020-07-01"]


def test_an_answer_out_of_protocol_is_an_error_that_names_the_url():
    with MetadataServer("aws") as server:
        with pytest.raises(MetadataError, match="HTTP 401"):
            spot_notice._request(f"{server.url}/latest/meta-data/spot/instance-action", {})
    with pytest.raises(MetadataError, match="127.0.0.1:9"):
        spot_notice.client("gcp", "http://127.0.0.1:9").poll()  # nothing listens on port 9


# ------------------------------------------------------------------ which cloud, cheaply

@pytest.mark.parametrize("files, provider", [
    ({"sys_vendor": "Amazon EC2", "product_name": "m5.large"}, "aws"),
    ({"sys_vendor": "Xen", "bios_vendor": "Amazon EC2"}, "aws"),
    ({"sys_vendor": "Google", "product_name": "Google Compute Engine"}, "gcp"),
    ({"sys_vendor": "Microsoft Corporation", "chassis_asset_tag": spot_notice.AZURE_ASSET_TAG}, "azure"),
    ({"sys_vendor": "Microsoft Corporation", "chassis_asset_tag": "Hyper-V on a laptop"}, None),
    ({"sys_vendor": "QEMU", "product_name": "Standard PC"}, None),
    ({}, None),
])
def test_the_cloud_is_found_from_dmi_strings_alone(tmp_path, files, provider):
    for name, text in files.items():
        (tmp_path / name).write_text(text + "\n")
    assert detect_provider(tmp_path) == provider


def test_auto_off_a_cloud_watches_nothing_and_none_never_watches(tmp_path):
    assert resolve_provider(SupervisorConfig(spot_notice="auto"), tmp_path) is None
    (tmp_path / "sys_vendor").write_text("Google\n")
    assert resolve_provider(SupervisorConfig(spot_notice="auto"), tmp_path) == "gcp"
    assert resolve_provider(SupervisorConfig(spot_notice="none"), tmp_path) is None
    assert resolve_provider(SupervisorConfig(spot_notice="azure"), tmp_path) == "azure"


@pytest.mark.parametrize("key, value, message", [
    ("spot_notice", "oracle", "must be auto, none, aws, gcp or azure"),
    ("spot_poll_s", 0, "must be > 0"),
    ("spot_margin_s", -1, "must be >= 0"),
    ("spot_endpoint", "169.254.169.254", "must be an http:// or https:// URL"),
])
def test_bad_spot_settings_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=f"supervisor.{key} {message}"):
        config_from_dict({"supervisor": {key: value}})


# ------------------------------------------------------------------ the watch

def test_the_watch_keeps_the_first_notice():
    with MetadataServer("aws") as server:
        watch = SpotWatch("aws", SupervisorConfig(spot_endpoint=server.url, spot_poll_s=0.05)).start()
        try:
            time.sleep(0.3)
            assert watch.notice is None
            server.give_notice(90)
            deadline = time.time() + 10
            while watch.notice is None and time.time() < deadline:
                time.sleep(0.02)
            assert watch.notice is not None and watch.seen_at is not None
        finally:
            watch.close()


def test_an_unreachable_service_is_one_warning_and_polling_goes_on(caplog):
    watch = SpotWatch("aws", SupervisorConfig(spot_endpoint="http://127.0.0.1:9", spot_poll_s=0.02))
    with caplog.at_level(logging.WARNING, logger="paddlerun.supervisor"):
        watch.start()
        time.sleep(0.5)
        watch.close()
    warnings = [r for r in caplog.records if "preemption notice" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "spot_notice: none" in warnings[0].getMessage()


def test_the_lead_is_the_margin_twice_the_snapshot_and_one_agreement_period(tmp_path):
    watch = SpotWatch("aws", SupervisorConfig(spot_margin_s=7))
    assert watch.lead_s(tmp_path, agreement_steps=10) == 7  # nothing measured yet
    (tmp_path / "events.jsonl").write_text(
        json.dumps({"event": "snapshot_committed", "capture_s": 0.5, "persist_s": 2.0}) + "\n"
        + json.dumps({"event": "snapshot_committed", "capture_s": 0.25, "persist_s": 1.25}) + "\n")
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 10, "time": 100.0}) + "\n" + json.dumps({"step": 20, "time": 102.0}) + "\n")
    # the newest snapshot (1.5 s) twice, and 10 steps of 0.2 s
    assert watch.lead_s(tmp_path, agreement_steps=10) == pytest.approx(7 + 3.0 + 2.0)


def test_status_shows_a_pending_notice_until_the_run_acted_on_it(tmp_path):
    from paddlerun.launcher import status_cmd
    now = time.time()
    lines = [{"event": "started", "attempt": 0, "time": now - 60},
             {"event": "preempt_notice", "attempt": 0, "time": now - 5, "provider": "aws",
              "action": "terminate", "deadline": now + 115, "stop_at": now + 100}]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    status = status_cmd.collect(tmp_path, now)
    assert status["preempt_notice"]["provider"] == "aws"
    assert "aws preemption (terminate) seen" in status_cmd.human(status)
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write(json.dumps({"event": "preempted", "attempt": 0, "time": now}) + "\n")
    assert status_cmd.collect(tmp_path, now)["preempt_notice"] is None
