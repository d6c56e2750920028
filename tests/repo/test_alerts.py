"""The alerting rules: `promtool test rules` with series that mimic each pattern and normal
traffic that must not fire, the PrometheusRule is the same rules, and one end-to-end run of
the real Prometheus scraping a running tokensvc until a refresh-token replay fires.

promtool and prometheus come from Debian's `prometheus` package (.ci/tools.d/prometheus.sh).
"""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.support import ServerThread, wait_until
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "tokensvc-alerts.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "kubernetes" / "monitoring" / "prometheusrule.yaml"
JOB = 'job="tokensvc"'
ERRORS = "rpc_server_call_duration_seconds_count"


@dataclass
class Case:
    """Series (``name{labels}`` -> promtool values, one per minute) and, for each alert,
    the minute it must fire at with the extra labels it fires with; ``quiet`` lists the
    minutes at which nothing may fire."""

    name: str
    series: dict[str, str]
    fires: dict[str, tuple[int, dict[str, str]]] = field(default_factory=dict)
    quiet: tuple[int, ...] = ()


CASES = [
    Case(
        "reuse",
        {"tokensvc_tokens_reuse_detections_total": "0x10 1x10"},
        {"TokensvcRefreshTokenReuse": (12, {})},
        quiet=(9,),
    ),
    Case("no reuse", {"tokensvc_tokens_reuse_detections_total": "0x120"}, quiet=(30, 119)),
    Case(
        "issue burst",
        {'tokensvc_tokens_issued_total{bound="false"}': "0+60x90 5400+600x20"},
        {"TokensvcIssueBurst": (102, {})},
        quiet=(89,),
    ),
    # a normal day: traffic doubling within an hour (morning) is not a burst
    Case(
        "issue morning ramp",
        {'tokensvc_tokens_issued_total{bound="false"}': "0+60x60 3600+120x60 10800+180x60"},
        quiet=(70, 130, 179),
    ),
    Case(
        "issue burst of one client",
        {
            'tokensvc_tokens_issued_total{bound="false",client_id="web"}': "0+60x90 5400+60x20",
            'tokensvc_tokens_issued_total{bound="false",client_id="batch"}': "0+6x90 540+300x20",
        },
        {"TokensvcIssueBurstByClient": (102, {"client_id": "batch"})},
        quiet=(89,),
    ),
    Case(
        "auth failure burst",
        {
            'tokensvc_auth_failures_total{rpc="Refresh",reason="invalid"}': "0+6x90 540+120x20",
        },
        {"TokensvcAuthFailureBurst": (102, {})},
        quiet=(89,),
    ),
    Case(
        "expired refresh tokens are normal",
        {
            'tokensvc_auth_failures_total{rpc="Refresh",reason="expired"}': "0+6x90 540+600x20",
            'tokensvc_auth_failures_total{rpc="Refresh",reason="invalid"}': "0+6x110",
        },
        quiet=(100, 109),
    ),
    Case(
        "policy denials",
        {'tokensvc_policy_denials_total{rpc="Issue",reason="policy"}': "0x10 0+3x20"},
        {"TokensvcPolicyDenials": (20, {"rpc": "Issue"})},
        quiet=(9,),
    ),
    Case(
        "a stray denial",
        {'tokensvc_policy_denials_total{rpc="Issue",reason="policy"}': "0+0.1x120"},
        quiet=(60, 119),
    ),
    Case(
        "rate limits",
        {'tokensvc_rate_limit_refusals_total{limit="Issue"}': "0x10 0+30x30"},
        {"TokensvcRateLimitRefusals": (30, {"limit": "Issue"})},
        quiet=(12,),
    ),
    Case(
        "a few refusals",
        {'tokensvc_rate_limit_refusals_total{limit="Issue"}': "0+3x120"},
        quiet=(60,),
    ),
    Case(
        "audit dropped",
        {"tokensvc_audit_dropped_total": "0x10 5x10"},
        {"TokensvcAuditRecordsDropped": (12, {})},
        quiet=(9,),
    ),
    Case("audit drops long ago", {"tokensvc_audit_dropped_total": "0x10 5x60"}, quiet=(40, 69)),
    Case(
        "feed stale",
        {'tokensvc_client_feed_stale{instance="orders-1"}': "0x5 1x10"},
        {"TokensvcRevocationFeedStale": (9, {})},
        quiet=(6,),
    ),
    Case(
        "feed reconnect blip",
        {'tokensvc_client_feed_stale{instance="orders-1"}': "0x5 1 0x10"},
        quiet=(6, 7, 8, 12),
    ),
    Case(
        "rotation overdue",
        {"tokensvc_keys_rotation_due_seconds": "-3000-60x40"},
        {"TokensvcKeyRotationOverdue": (30, {})},
        quiet=(15,),
    ),
    Case("rotation scheduled", {"tokensvc_keys_rotation_due_seconds": "86400-60x120"}, quiet=(60,)),
    Case(
        "redis unavailable",
        {'tokensvc_redis_unavailable_total{kind="ConnectionError"}': "0x10 0+60x10"},
        {"TokensvcRedisUnavailable": (15, {})},
        quiet=(9,),
    ),
    Case(
        "a redis blip",
        {'tokensvc_redis_unavailable_total{kind="ConnectionError"}': "0x10 3x60"},
        quiet=(11, 12, 40),
    ),
    Case(
        "certificate expiring",
        {"tokensvc_tls_certificate_remaining_seconds": "864000-8640x120"},
        {"TokensvcCertificateExpiring": (50, {})},
        quiet=(29,),
    ),
    Case(
        "certificate with a month left",
        {"tokensvc_tls_certificate_remaining_seconds": "2592000-60x120"},
        quiet=(30, 119),
    ),
    Case(
        "error budget burn",
        {
            f'{ERRORS}{{rpc_response_status_code="OK"}}': "0+6000x70",
            f'{ERRORS}{{rpc_response_status_code="UNAVAILABLE"}}': "0x60 0+1500x10",
        },
        {"TokensvcErrorBudgetBurn": (68, {})},
        quiet=(59,),
    ),
    Case(
        "errors within budget",
        {
            f'{ERRORS}{{rpc_response_status_code="OK"}}': "0+6000x120",
            f'{ERRORS}{{rpc_response_status_code="INTERNAL"}}': "0+3x120",
        },
        quiet=(60, 119),
    ),
]


def _rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def _with_job(series: str) -> str:
    name, brace, rest = series.partition("{")
    return f"{name}{{{JOB},{rest}" if brace else f"{name}{{{JOB}}}"


def _promtool_tests() -> dict[str, Any]:
    rules = {rule["alert"]: rule for rule in _rules()}
    tests = []
    for case in CASES:
        checks = []
        for alert, (minute, labels) in case.fires.items():
            rule = rules[alert]
            expected = {"job": "tokensvc", **rule["labels"], **labels}
            checks.append(
                {
                    "eval_time": f"{minute}m",
                    "alertname": alert,
                    "exp_alerts": [
                        {"exp_labels": expected, "exp_annotations": rule["annotations"]}
                    ],
                }
            )
        for minute in case.quiet:
            checks += [{"eval_time": f"{minute}m", "alertname": a, "exp_alerts": []} for a in rules]
        tests.append(
            {
                "name": case.name,
                "interval": "1m",
                "input_series": [
                    {"series": _with_job(s), "values": v} for s, v in case.series.items()
                ],
                "alert_rule_test": checks,
            }
        )
    return {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}


def test_rules_are_valid_and_documented():
    result = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    runbook = (ROOT / "deploy" / "README.md").read_text()
    for rule in _rules():
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert rule["annotations"]["summary"]
        assert f"#### {rule['alert']}" in runbook, f"no runbook paragraph for {rule['alert']}"
        assert rule["annotations"]["runbook"] == f"deploy/README.md#{rule['alert'].lower()}"


def test_every_alert_has_a_firing_and_a_quiet_case():
    alerts = {rule["alert"] for rule in _rules()}
    assert {a for case in CASES for a in case.fires} == alerts
    assert all(case.quiet for case in CASES)


def test_promtool_rule_tests(tmp_path):
    spec = tmp_path / "tests.yml"
    spec.write_text(yaml.safe_dump(_promtool_tests(), sort_keys=False))
    result = subprocess.run(
        ["promtool", "test", "rules", str(spec)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheusrule_is_the_rules_file():
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


# -- end to end: the real Prometheus scraping a running tokensvc --------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:  # loopback only
        return json.loads(reply.read())


def test_prometheus_fires_the_reuse_alert_after_a_replay(make_settings, start_server, tmp_path):
    srv: ServerThread = start_server(make_settings(metrics_listen="127.0.0.1:0"))
    assert srv.running.metrics_http is not None
    web = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "tokensvc",
                        "static_configs": [
                            {"targets": [f"127.0.0.1:{srv.running.metrics_http.port}"]}
                        ],
                    }
                ],
            }
        )
    )
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{web}/api/v1"
    try:
        query = f"{api}/query?query=tokensvc_tokens_reuse_detections_total"

        def scraped_twice() -> bool:
            try:
                return bool(_get(query)["data"]["result"]) and bool(
                    _get(f"{api}/query?query=count_over_time(up[1m])>=2")["data"]["result"]
                )
            except OSError:
                return False

        wait_until(scraped_twice, 30, what="two scrapes of tokensvc", interval=0.5)
        with srv.channel() as chan:
            stub = pb_grpc.TokenServiceStub(chan)
            old = stub.Issue(pb.IssueRequest(subject="mallory")).tokens.refresh_token
            new = stub.Refresh(pb.RefreshRequest(refresh_token=old)).tokens.refresh_token
            stub.Refresh(pb.RefreshRequest(refresh_token=new))
            with pytest.raises(grpc.RpcError) as err:
                stub.Refresh(pb.RefreshRequest(refresh_token=old))  # the replay
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        def firing() -> bool:
            alerts = _get(f"{api}/alerts")["data"]["alerts"]
            return any(
                a["labels"]["alertname"] == "TokensvcRefreshTokenReuse" and a["state"] == "firing"
                for a in alerts
            )

        wait_until(firing, 30, what="TokensvcRefreshTokenReuse firing", interval=0.5)
    finally:
        proc.terminate()
        proc.wait(10)
