"""The synthesized template says what splicegate needs; no AWS account involved.

Each template comes from running app.py exactly as `cdk synth` does, with a
config.json variant; the splicegate config is taken back out of the
instances' user data and checked with the real `splicegate check`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest
from aws_cdk.assertions import Match, Template

HERE = os.path.dirname(os.path.abspath(__file__))
APP_DIR = os.path.dirname(HERE)
REPO = os.path.normpath(os.path.join(APP_DIR, "..", ".."))
sys.path.insert(0, APP_DIR)

from splicegate_fleet.settings import Settings, SettingsError
from splicegate_fleet.stack import CONFIG_MARK

# jsii warns on every run when the Node.js version is past its end of life;
# the value lists the major versions to keep quiet about.
ENV = dict(os.environ, JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION="18,20")


def _binary() -> str:
    """The splicegate binary the tests run `check` with (and ship as the asset)."""
    candidates = [os.environ.get("SPLICEGATE_BIN", "")] + [
        os.path.join(REPO, "target", kind, "splicegate") for kind in ("debug", "release")
    ]
    for c in candidates:
        if c and os.path.isfile(c):
            return c
    reason = "no splicegate binary: run `cargo build` first or set SPLICEGATE_BIN"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _shipped() -> dict:
    with open(os.path.join(APP_DIR, "config.json"), encoding="utf-8") as f:
        return json.load(f)


VARIANTS = {
    # config.json as shipped: a new two-zone VPC.
    "new-vpc": {},
    # The optional QUIC side: a UDP listener and target group of its own.
    "quic": {"udp": True, "udpClientNetworks": ["192.0.2.0/24"]},
    # An existing VPC with three zones, endpoint ids and consumer principals.
    "existing-vpc": {
        "vpc": {
            "id": "vpc-0123456789abcdef0",
            "cidr": "10.20.0.0/16",
            "availabilityZones": ["eu-west-1a", "eu-west-1b", "eu-west-1c"],
            "privateSubnetIds": ["subnet-0aaaaaaaaaaaaaaa1", "subnet-0aaaaaaaaaaaaaaa2", "subnet-0aaaaaaaaaaaaaaa3"],
            "routeTableIds": ["rtb-0aaaaaaaaaaaaaaa1", "rtb-0aaaaaaaaaaaaaaa2", "rtb-0aaaaaaaaaaaaaaa3"],
            "createS3Endpoint": True,
        },
        "agentNetworks": ["10.150.248.0/24", "10.150.249.0/24"],
        "allowedPrincipals": ["arn:aws:iam::111122223333:root"],
        "allowedVpce": ["vpce-02c333708db2e72b7"],
        "minInstances": 3,
        "maxInstances": 6,
        "drainGraceSeconds": 45,
        "drainTimeoutSeconds": 600,
        "deregistrationDelaySeconds": 900,
        "keepaliveSeconds": 120,
        "nlbIdleTimeoutSeconds": 600,
        "healthCheck": {"intervalSeconds": 10, "timeoutSeconds": 5, "healthyThreshold": 2, "unhealthyThreshold": 3},
    },
}


def _config_file(tmp_path, overrides: dict) -> str:
    raw = _shipped()
    raw.update(overrides)
    raw["binary"] = _binary()
    raw["systemdUnit"] = os.path.join(REPO, "systemd", "splicegate.service")
    raw["lifecycleUnit"] = os.path.join(REPO, "systemd", "splicegate-lifecycle.service")
    raw["routes"] = os.path.join(APP_DIR, "routes.toml")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return str(path)


def _synth(config: str, outdir) -> subprocess.CompletedProcess:
    env = dict(ENV, SPLICEGATE_CDK_CONFIG=config, CDK_OUTDIR=str(outdir))
    return subprocess.run(
        [sys.executable, "app.py"], check=False, cwd=APP_DIR, env=env, capture_output=True, text=True, timeout=300
    )


class Synth:
    def __init__(self, name: str, config: str, template: dict, metadata: dict):
        self.name = name
        self.metadata = metadata
        self.settings = Settings.load(config)
        self.json = template
        self.template = Template.from_json(template)
        self.toml_text = _user_data_config(template)
        self.toml = tomllib.loads(self.toml_text)

    def resources(self, kind: str) -> list[dict]:
        return [r["Properties"] for r in self.json["Resources"].values() if r["Type"] == kind]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def synth(request, tmp_path_factory) -> Synth:
    tmp = tmp_path_factory.mktemp(request.param)
    config = _config_file(tmp, VARIANTS[request.param])
    run = _synth(config, tmp / "cdk.out")
    assert run.returncode == 0, f"app.py failed:\n{run.stderr[-4000:]}"
    name = Settings.load(config).stack_name
    with open(tmp / "cdk.out" / f"{name}.template.json", encoding="utf-8") as f:
        template = json.load(f)
    with open(tmp / "cdk.out" / f"{name}.metadata.json", encoding="utf-8") as f:
        manifest = json.load(f)
    return Synth(request.param, config, template, manifest)


def _user_data(template: dict) -> str:
    """The instances' boot script, with "<token>" for CloudFormation references."""
    (lt,) = [r for r in template["Resources"].values() if r["Type"] == "AWS::EC2::LaunchTemplate"]
    parts = lt["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Join"][1]
    return "".join(p if isinstance(p, str) else "<token>" for p in parts)


def _script(s: Synth) -> str:
    return _user_data(s.json)


def _user_data_config(template: dict) -> str:
    """The file user data writes to /etc/splicegate/splicegate.toml."""
    script = _user_data(template)
    m = re.search(
        rf"cat > /etc/splicegate/splicegate\.toml <<'{CONFIG_MARK}'\n(.*?)\n{CONFIG_MARK}\n", script, re.DOTALL
    )
    assert m, f"user data writes no splicegate config:\n{script}"
    assert "<token>" not in m.group(1), "the config must be literal text"
    return m.group(1) + "\n"


def _seconds(duration: str) -> int:
    m = re.fullmatch(r"(\d+)(s|m|h)", duration)
    assert m, f"unexpected duration {duration!r}"
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def _attrs(props: dict, key: str = "TargetGroupAttributes") -> dict:
    return {a["Key"]: a["Value"] for a in props.get(key, [])}


def _target_group(s: Synth, protocol: str = "TCP") -> dict:
    (tg,) = [t for t in s.resources("AWS::ElasticLoadBalancingV2::TargetGroup") if t["Protocol"] == protocol]
    return tg


# -- what the NLB does ---------------------------------------------------------------


def test_proxy_protocol_v2_is_on_and_sources_are_the_nlb(synth):
    tg = _target_group(synth)
    assert (tg["Protocol"], tg["Port"], tg["TargetType"]) == ("TCP", 8443, "instance")
    attrs = _attrs(tg)
    assert attrs["proxy_protocol_v2.enabled"] == "true"
    assert attrs["preserve_client_ip.enabled"] == "false"
    (listener,) = synth.toml["listener"]
    assert listener["proxy_protocol"] == "v2"
    assert listener["proxy_trusted"] == [synth.settings.vpc_cidr]


def test_health_check_is_http_on_the_admin_port(synth):
    tg = _target_group(synth)
    assert tg["HealthCheckProtocol"] == "HTTP"
    assert tg["HealthCheckPort"] == "8989"
    assert tg["HealthCheckPath"] == "/health"
    assert tg["Matcher"] == {"HttpCode": "200"}
    assert synth.toml["admin"]["bind"].endswith(":8989")


def test_nlb_notices_a_drain_before_drain_grace_ends(synth):
    tg = _target_group(synth)
    grace = _seconds(synth.toml["shutdown"]["drain_grace"])
    assert tg["HealthCheckIntervalSeconds"] * tg["UnhealthyThresholdCount"] < grace


def test_established_sessions_outlive_the_drain(synth):
    attrs = _attrs(_target_group(synth))
    # Deregistration (the first step of a scale-in) keeps established flows:
    # the instance's watcher decides when they end.
    assert attrs["deregistration_delay.connection_termination.enabled"] == "false"
    shutdown = synth.toml["shutdown"]
    grace, timeout = _seconds(shutdown["drain_grace"]), _seconds(shutdown["drain_timeout"])
    assert int(attrs["deregistration_delay.timeout_seconds"]) >= timeout
    # A draining splicegate fails its health check; the NLB must not close
    # the sessions it still serves.
    assert attrs["target_health_state.unhealthy.connection_termination.enabled"] == "false"
    assert int(attrs["target_health_state.unhealthy.draining_interval_seconds"]) >= grace + timeout
    # systemd lets the drain run to its end when the instance shuts down.
    (stop,) = re.findall(r"TimeoutStopSec=%s\\n' (\d+) > /etc/systemd/system/splicegate\.service\.d/", _script(synth))
    assert int(stop) > grace + timeout


def test_idle_timeout_exceeds_keepalive(synth):
    (listener,) = [l for l in synth.resources("AWS::ElasticLoadBalancingV2::Listener") if l["Protocol"] == "TCP"]
    assert listener["Port"] == 8443
    idle = int(_attrs(listener, "ListenerAttributes")["tcp.idle_timeout.seconds"])
    assert idle > _seconds(synth.toml["listener"][0]["keepalive_time"])


def test_nlb_is_internal_with_the_chosen_cross_zone(synth):
    (nlb,) = synth.resources("AWS::ElasticLoadBalancingV2::LoadBalancer")
    assert nlb["Type"] == "network"
    assert nlb["Scheme"] == "internal"
    attrs = _attrs(nlb, "LoadBalancerAttributes")
    assert attrs["load_balancing.cross_zone.enabled"] == str(synth.settings.cross_zone).lower()


# -- network exposure ----------------------------------------------------------------


def _rules(s: Synth, direction: str) -> list[dict]:
    inline = "SecurityGroupIngress" if direction == "ingress" else "SecurityGroupEgress"
    separate = "AWS::EC2::SecurityGroupIngress" if direction == "ingress" else "AWS::EC2::SecurityGroupEgress"
    rules = [r for sg in s.resources("AWS::EC2::SecurityGroup") for r in sg.get(inline, [])]
    return rules + s.resources(separate)


def test_security_groups_admit_8443_and_8989_from_the_vpc_only(synth):
    vpc = ipaddress.ip_network(synth.settings.vpc_cidr)
    rules = [r for r in _rules(synth, "ingress") if r["IpProtocol"] == "tcp"]
    assert sorted(r["FromPort"] for r in rules) == [8443, 8989]
    for r in rules:
        assert r["FromPort"] == r["ToPort"], r
        assert "CidrIp" in r and ipaddress.ip_network(r["CidrIp"]).subnet_of(vpc), r
    udp = [r for r in _rules(synth, "ingress") if r["IpProtocol"] == "udp"]
    if not synth.settings.udp:
        assert udp == []
        return
    # QUIC: the VPC (PrivateLink, the NLB's addresses) and the configured
    # client ranges (client IPs are preserved on UDP), on the UDP port only.
    port = synth.settings.udp_port
    assert {(r["FromPort"], r["ToPort"]) for r in udp} == {(port, port)}
    assert sorted(r["CidrIp"] for r in udp) == sorted([synth.settings.vpc_cidr, *synth.settings.udp_client_networks])


def test_security_groups_let_out_only_agents_and_s3(synth):
    agents = {str(ipaddress.ip_network(n)) for n in synth.settings.agent_networks}
    seen = set()
    for r in _rules(synth, "egress"):
        if "DestinationPrefixListId" in r:
            # The S3 prefix list, for the boot download through the gateway endpoint.
            assert (r["IpProtocol"], r["FromPort"], r["ToPort"]) == ("tcp", 443, 443), r
            continue
        if r["IpProtocol"] == "udp":
            # QUIC to the agents' quic-port, only with the QUIC side on.
            assert synth.settings.udp, r
            port = synth.settings.udp_port
            assert (r["FromPort"], r["ToPort"]) == (port, port), r
            assert r["CidrIp"] in agents, r
            continue
        assert (r["IpProtocol"], r["FromPort"], r["ToPort"]) == ("tcp", 8443, 8443), r
        assert r["CidrIp"] in agents, r
        seen.add(r["CidrIp"])
    assert seen == agents


def test_instances_boot_without_leaving_aws(synth):
    # S3 through a gateway endpoint, and no route to the internet at all.
    assert synth.resources("AWS::EC2::InternetGateway") == []
    assert synth.resources("AWS::EC2::NatGateway") == []
    endpoints = synth.resources("AWS::EC2::VPCEndpoint")
    assert any(e.get("VpcEndpointType", "Gateway") == "Gateway" for e in endpoints)
    script = json.dumps(synth.resources("AWS::EC2::LaunchTemplate"))
    assert "curl" not in script and "wget" not in script and "http://" not in script


# -- the fleet -----------------------------------------------------------------------


def test_user_data_config_passes_splicegate_check(synth, tmp_path):
    path = tmp_path / "splicegate.toml"
    path.write_text(synth.toml_text)
    run = subprocess.run(
        [_binary(), "check", "--config", str(path)], check=False, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert f"{path}: OK" in run.stdout + run.stderr
    (listener,) = synth.toml["listener"]
    assert listener["bind"] == ["0.0.0.0:8443"]
    assert listener.get("allowed_vpce", []) == synth.settings.allowed_vpce


def test_user_data_installs_binary_unit_and_starts_the_service(synth):
    (lt,) = synth.resources("AWS::EC2::LaunchTemplate")
    script = _script(synth)
    order = [
        "aws s3 cp 's3://<token>/",
        "install -m 0755 /tmp/splicegate /usr/local/bin/splicegate",
        "useradd --system",
        "/usr/local/bin/splicegate check --config /etc/splicegate/splicegate.toml",
        "install -m 0644 /tmp/splicegate.service /etc/systemd/system/splicegate.service",
        "systemctl enable --now splicegate",
    ]
    at = [script.find(step) for step in order]
    assert -1 not in at and at == sorted(at), script
    assert script.startswith("#!/bin/bash\nset -euo pipefail\n")
    syntax = subprocess.run(["bash", "-n"], check=False, input=script, capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    assert lt["LaunchTemplateData"]["MetadataOptions"]["HttpTokens"] == "required"


def test_a_dynamically_linked_binary_is_flagged(synth):
    warnings = [m["data"] for entries in synth.metadata.values() for m in entries if m["type"] == "aws:cdk:warning"]
    flagged = any("is dynamically linked" in str(w) for w in warnings)
    assert flagged == (not synth.settings.binary_is_static), warnings


def test_auto_scaling_group_spans_the_zones(synth):
    (group,) = synth.resources("AWS::AutoScaling::AutoScalingGroup")
    zones = len(synth.settings.availability_zones) if synth.settings.vpc_id else 2
    assert int(group["MinSize"]) >= zones
    assert int(group["MaxSize"]) >= int(group["MinSize"])
    assert len(group["VPCZoneIdentifier"]) == zones
    assert group["HealthCheckType"] == "ELB"
    assert group["TargetGroupARNs"], "instances register with the target group"


def test_scale_in_waits_for_sessions(synth):
    si = synth.settings.scale_in
    (hook,) = synth.resources("AWS::AutoScaling::LifecycleHook")
    assert hook["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
    assert hook["LifecycleHookName"] == "splicegate-drain"
    assert hook["HeartbeatTimeout"] == si.heartbeat_timeout
    assert hook["DefaultResult"] == si.default_result
    (group,) = synth.resources("AWS::AutoScaling::AutoScalingGroup")
    assert group["AutoScalingGroupName"] == synth.settings.group_name()
    # The watcher runs on every instance, with the group, hook and timings.
    script = _script(synth)
    env = re.search(r"printf '([^']*)' > /etc/splicegate/lifecycle\.env", script)
    assert env, script
    values = dict(line.split("=", 1) for line in env.group(1).replace("\\n", "\n").splitlines() if line)
    assert values == {
        "GROUP": synth.settings.group_name(),
        "HOOK": "splicegate-drain",
        "HEARTBEAT": f"{si.heartbeat}s",
        "MAX": f"{si.max_wait}s",
    }, values
    assert si.heartbeat < si.heartbeat_timeout
    for step in ["/etc/systemd/system/splicegate-lifecycle.service", "systemctl enable --now splicegate-lifecycle"]:
        assert step in script, step


def test_instances_may_act_on_their_own_group_only(synth):
    statements = [
        st
        for p in synth.resources("AWS::IAM::Policy")
        for st in p["PolicyDocument"]["Statement"]
        if any(str(a).startswith("autoscaling:") for a in _list(st["Action"]))
    ]
    (st,) = statements
    assert st["Effect"] == "Allow"
    assert sorted(_list(st["Action"])) == [
        "autoscaling:CompleteLifecycleAction",
        "autoscaling:RecordLifecycleActionHeartbeat",
    ]
    (resource,) = _list(st["Resource"])
    text = json.dumps(resource)
    assert "autoScalingGroup" in text and f"autoScalingGroupName/{synth.settings.group_name()}" in text, text
    assert '"*"' not in text.replace(":*:", ""), text


def _list(v) -> list:
    return v if isinstance(v, list) else [v]


def test_endpoint_service_requires_acceptance(synth):
    synth.template.has_resource_properties(
        "AWS::EC2::VPCEndpointService",
        {"AcceptanceRequired": True, "NetworkLoadBalancerArns": [Match.any_value()]},
    )
    permissions = synth.resources("AWS::EC2::VPCEndpointServicePermissions")
    if synth.settings.allowed_principals:
        (p,) = permissions
        assert p["AllowedPrincipals"] == synth.settings.allowed_principals
    else:
        assert permissions == []


def test_outputs_name_the_service_and_the_nlb(synth):
    outputs = synth.json["Outputs"]
    assert "EndpointServiceName" in outputs and "NlbDnsName" in outputs


# -- a config.json that would break the deployment is refused -----------------------


BAD = [
    ({"drainGraceSeconds": 20}, "drainGraceSeconds: 20 s must exceed"),
    ({"deregistrationDelaySeconds": 120}, "deregistrationDelaySeconds: 120 s is below drainTimeoutSeconds"),
    ({"keepaliveSeconds": 400}, "keepaliveSeconds: 400 s must be below nlbIdleTimeoutSeconds"),
    ({"udp": True, "udpPort": 8443}, "udpPort: 8443 is taken"),
    ({"udpClientNetworks": ["192.0.2.0/24"]}, 'udpClientNetworks: only with "udp": true'),
    ({"minInstances": 1}, "minInstances: 1 is fewer than one per availability zone"),
    ({"agentNetworks": []}, "agentNetworks: list the CIDRs"),
    ({"agentNetworks": ["10.150.248.1/24"]}, "agentNetworks: 10.150.248.1/24 has host bits set"),
    ({"allowedVpce": ["endpoint-1"]}, "allowedVpce: 'endpoint-1' is not a VPC endpoint id"),
    ({"healthCheck": {"interval": 10}}, "healthCheck.interval: unknown key"),
    ({"drainTimeout": 300}, "drainTimeout: unknown key"),
    ({"nlbIdleTimeoutSeconds": 30}, "nlbIdleTimeoutSeconds: expected an integer in 60..=6000"),
    ({"architecture": "arm64"}, "binary: "),
    ({"vpc": {"id": "vpc-1", "availabilityZones": ["a"], "privateSubnetIds": []}}, "vpc: an existing VPC needs"),
    ({"scaleIn": {"heartbeatTimeoutSeconds": 300, "heartbeatSeconds": 300}}, "scaleIn.heartbeatSeconds: 300 s must be below"),
    ({"scaleIn": {"heartbeatTimeoutSeconds": 60, "heartbeatSeconds": 30}}, "scaleIn.maxWaitSeconds: 28800 s is more than 100"),
    ({"scaleIn": {"defaultResult": "STOP"}}, "scaleIn.defaultResult: 'STOP' is not"),
    ({"scaleIn": {"maxWait": 10}}, "scaleIn.maxWait: unknown key"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_inconsistent_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(SettingsError) as e:
        Settings.load(_config_file(tmp_path, overrides))
    assert message in str(e.value)


def test_routes_may_not_set_what_the_stack_writes(tmp_path):
    routes = tmp_path / "routes.toml"
    routes.write_text('[admin]\nbind = "0.0.0.0:9999"\n')
    with pytest.raises(SettingsError, match=r"routes: .* has \[admin\]"):
        Settings.load(_config_file(tmp_path, {}), {"routes": str(routes)})
    routes.write_text('[[agent_in_name]]\nsuffix = "a.example"\nallow = ["10.99.0.0/16"]\n')
    with pytest.raises(SettingsError, match="allows 10.99.0.0/16, outside agentNetworks"):
        Settings.load(_config_file(tmp_path, {}), {"routes": str(routes)})


def test_app_exits_with_the_reason(tmp_path):
    run = _synth(_config_file(tmp_path, {"keepaliveSeconds": 400}), tmp_path / "out")
    assert run.returncode != 0
    assert "config.json: keepaliveSeconds: 400 s must be below" in run.stderr
    assert not (tmp_path / "out").exists()


# -- the optional QUIC side -----------------------------------------------------------


def test_the_quic_side_is_off_by_default_and_whole_when_on(synth):
    udp_listeners = [l for l in synth.resources("AWS::ElasticLoadBalancingV2::Listener") if l["Protocol"] == "UDP"]
    udp_groups = [t for t in synth.resources("AWS::ElasticLoadBalancingV2::TargetGroup") if t["Protocol"] == "UDP"]
    if not synth.settings.udp:
        assert udp_listeners == [] and udp_groups == []
        assert "udp_listener" not in synth.toml
        return
    port = synth.settings.udp_port
    # A plain UDP listener on a port of its own (not TCP_UDP, not QUIC).
    (listener,) = udp_listeners
    assert listener["Port"] == port
    (tg,) = udp_groups
    assert (tg["Port"], tg["TargetType"]) == (port, "instance")
    # Health: the admin port's /health, as for TCP: a drain shows on both.
    assert (tg["HealthCheckProtocol"], tg["HealthCheckPort"], tg["HealthCheckPath"]) == ("HTTP", "8989", "/health")
    attrs = _attrs(tg)
    assert attrs["deregistration_delay.connection_termination.enabled"] == "false"
    assert "preserve_client_ip.enabled" not in attrs, "cannot be turned off on UDP target groups"
    (relay,) = synth.toml["udp_listener"]
    assert relay["bind"] == [f"0.0.0.0:{port}"]
    assert relay["agent_port"] == port
    assert relay["lb_networks"] == [synth.settings.vpc_cidr]
    assert _seconds(relay["idle_timeout"]) > 120, "above the NLB's UDP flow timeout"
    # The socket buffers the relay asks for.
    assert "net.core.rmem_max = 4194304" in _script(synth)
