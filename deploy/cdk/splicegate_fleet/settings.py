"""config.json: the one file an operator edits, read and checked before synthesis.

Every rule that ties an NLB setting to a splicegate setting is checked here,
so a `cdk synth` with an inconsistent file fails with a message naming the
keys instead of deploying a fleet whose drain cuts sessions.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from dataclasses import dataclass, field

# Ports the stack opens; splicegate's listener and admin ports.
TRAFFIC_PORT = 8443
ADMIN_PORT = 8989
HEALTH_PATH = "/health"

# Tables the stack writes itself; a routes file must leave them out.
STACK_TABLES = ("listener", "udp_listener", "admin", "shutdown")

# The NLB forgets an idle UDP flow after 120 s (fixed); splicegate must
# remember it longer.
NLB_UDP_IDLE = 120
UDP_IDLE_TIMEOUT = 180

# ELF e_machine values of the architectures Amazon Linux 2023 runs on.
ELF_MACHINES = {"x86_64": 0x3E, "arm64": 0xB7}

KNOWN_KEYS = {
    "stackName",
    "account",
    "region",
    "vpc",
    "agentNetworks",
    "instanceType",
    "architecture",
    "minInstances",
    "maxInstances",
    "cpuTargetPercent",
    "allowedPrincipals",
    "allowedVpce",
    "crossZone",
    "udp",
    "udpPort",
    "udpClientNetworks",
    "binary",
    "systemdUnit",
    "routes",
    "drainGraceSeconds",
    "drainTimeoutSeconds",
    "keepaliveSeconds",
    "nlbIdleTimeoutSeconds",
    "deregistrationDelaySeconds",
    "healthCheck",
    "scaleIn",
    "lifecycleUnit",
}
VPC_KEYS = {"id", "cidr", "availabilityZones", "privateSubnetIds", "routeTableIds", "createS3Endpoint"}
HEALTH_KEYS = {"intervalSeconds", "timeoutSeconds", "healthyThreshold", "unhealthyThreshold"}
SCALE_IN_KEYS = {"heartbeatTimeoutSeconds", "heartbeatSeconds", "maxWaitSeconds", "defaultResult"}

# The termination lifecycle hook the stack adds to the group.
LIFECYCLE_HOOK = "splicegate-drain"


class SettingsError(ValueError):
    """config.json (or a file it names) is wrong; the message names the key."""


@dataclass
class HealthCheck:
    interval: int
    timeout: int
    healthy: int
    unhealthy: int


@dataclass
class ScaleIn:
    """The termination lifecycle hook and the on-instance watcher's timings."""

    heartbeat_timeout: int
    heartbeat: int
    max_wait: int
    default_result: str


@dataclass
class Settings:
    path: str
    stack_name: str
    account: str | None
    region: str | None
    vpc_id: str | None
    vpc_cidr: str
    availability_zones: list[str]
    private_subnet_ids: list[str]
    route_table_ids: list[str]
    create_s3_endpoint: bool
    agent_networks: list[str]
    instance_type: str
    architecture: str
    min_instances: int
    max_instances: int
    cpu_target_percent: int
    allowed_principals: list[str]
    allowed_vpce: list[str]
    cross_zone: bool
    udp: bool
    udp_port: int
    udp_client_networks: list[str]
    binary: str
    systemd_unit: str
    routes: str
    drain_grace: int
    drain_timeout: int
    keepalive: int
    nlb_idle_timeout: int
    deregistration_delay: int
    health: HealthCheck
    scale_in: ScaleIn
    lifecycle_unit: str
    binary_is_static: bool = field(default=True)

    @staticmethod
    def load(path: str, overrides: dict | None = None) -> Settings:
        """Read config.json (with `overrides` merged over it) and check it."""
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SettingsError(f"{path}: {e}") from e
        for key, value in (overrides or {}).items():
            raw[key] = value
        return Settings.from_dict(raw, path)

    @staticmethod
    def from_dict(raw: dict, path: str) -> Settings:
        base = os.path.dirname(os.path.abspath(path))
        _no_unknown(raw, KNOWN_KEYS, "")
        vpc = raw.get("vpc") or {}
        _no_unknown(vpc, VPC_KEYS, "vpc.")
        hc = raw.get("healthCheck") or {}
        _no_unknown(hc, HEALTH_KEYS, "healthCheck.")
        si = raw.get("scaleIn") or {}
        _no_unknown(si, SCALE_IN_KEYS, "scaleIn.")

        s = Settings(
            path=path,
            stack_name=_str(raw, "stackName", "SplicegateFleet"),
            account=raw.get("account"),
            region=raw.get("region"),
            vpc_id=vpc.get("id"),
            vpc_cidr=_cidr(vpc.get("cidr", "10.0.0.0/16"), "vpc.cidr"),
            availability_zones=list(vpc.get("availabilityZones") or []),
            private_subnet_ids=list(vpc.get("privateSubnetIds") or []),
            route_table_ids=list(vpc.get("routeTableIds") or []),
            create_s3_endpoint=bool(vpc.get("createS3Endpoint", True)),
            agent_networks=[_cidr(n, "agentNetworks") for n in raw.get("agentNetworks") or []],
            instance_type=_str(raw, "instanceType", "c7i.large"),
            architecture=_str(raw, "architecture", "x86_64"),
            min_instances=_int(raw, "minInstances", 2, 1, 1000),
            max_instances=_int(raw, "maxInstances", 4, 1, 1000),
            cpu_target_percent=_int(raw, "cpuTargetPercent", 60, 10, 95),
            allowed_principals=list(raw.get("allowedPrincipals") or []),
            allowed_vpce=list(raw.get("allowedVpce") or []),
            cross_zone=bool(raw.get("crossZone", True)),
            udp=bool(raw.get("udp", False)),
            udp_port=_int(raw, "udpPort", 8444, 1, 65535),
            udp_client_networks=[_cidr(n, "udpClientNetworks") for n in raw.get("udpClientNetworks") or []],
            binary=_file(base, raw, "binary"),
            systemd_unit=_file(base, raw, "systemdUnit"),
            routes=_file(base, raw, "routes"),
            drain_grace=_int(raw, "drainGraceSeconds", 30, 0, 3600),
            drain_timeout=_int(raw, "drainTimeoutSeconds", 300, 0, 3600),
            keepalive=_int(raw, "keepaliveSeconds", 60, 1, 32767),
            nlb_idle_timeout=_int(raw, "nlbIdleTimeoutSeconds", 350, 60, 6000),
            deregistration_delay=_int(raw, "deregistrationDelaySeconds", 300, 0, 3600),
            health=HealthCheck(
                interval=_int(hc, "intervalSeconds", 10, 5, 300, "healthCheck."),
                timeout=_int(hc, "timeoutSeconds", 5, 2, 120, "healthCheck."),
                healthy=_int(hc, "healthyThreshold", 3, 2, 10, "healthCheck."),
                unhealthy=_int(hc, "unhealthyThreshold", 2, 2, 10, "healthCheck."),
            ),
            scale_in=ScaleIn(
                heartbeat_timeout=_int(si, "heartbeatTimeoutSeconds", 900, 30, 7200, "scaleIn."),
                heartbeat=_int(si, "heartbeatSeconds", 300, 10, 7200, "scaleIn."),
                max_wait=_int(si, "maxWaitSeconds", 8 * 3600, 60, 48 * 3600, "scaleIn."),
                default_result=_str(si, "defaultResult", "CONTINUE"),
            ),
            lifecycle_unit=_file(base, {"lifecycleUnit": raw.get("lifecycleUnit", "../../systemd/splicegate-lifecycle.service")}, "lifecycleUnit"),
        )
        s._check()
        return s

    # -- the rules -----------------------------------------------------------------

    def _check(self) -> None:
        if self.udp_port in (TRAFFIC_PORT, ADMIN_PORT):
            raise SettingsError(
                f"udpPort: {self.udp_port} is taken (TCP {TRAFFIC_PORT} is the DCV listener, {ADMIN_PORT} "
                "the health port); QUIC needs a UDP listener on a port of its own (docs/quic.md)"
            )
        if self.udp_client_networks and not self.udp:
            raise SettingsError('udpClientNetworks: only with "udp": true')
        if self.architecture not in ELF_MACHINES:
            raise SettingsError(f"architecture: {self.architecture!r} is not one of {sorted(ELF_MACHINES)}")
        if not self.agent_networks:
            raise SettingsError("agentNetworks: list the CIDRs of the DCV agents; the instances may reach nothing else")
        for p in self.allowed_principals:
            if not isinstance(p, str) or not (p.startswith("arn:") or p == "*"):
                raise SettingsError(f"allowedPrincipals: {p!r} is not an IAM ARN")
        for v in self.allowed_vpce:
            if not isinstance(v, str) or not re.fullmatch(r"vpce-[0-9a-f]{8,17}", v):
                raise SettingsError(f"allowedVpce: {v!r} is not a VPC endpoint id (vpce-0123456789abcdef0)")
        if self.vpc_id is not None:
            if not self.availability_zones or len(self.availability_zones) != len(self.private_subnet_ids):
                raise SettingsError(
                    "vpc: an existing VPC needs availabilityZones and privateSubnetIds, one subnet per zone"
                )
            if self.create_s3_endpoint and len(self.route_table_ids) != len(self.private_subnet_ids):
                raise SettingsError(
                    "vpc.routeTableIds: one per private subnet, for the S3 gateway endpoint "
                    "(or set vpc.createS3Endpoint to false when the VPC has one)"
                )
        zones = len(self.availability_zones) if self.vpc_id is not None else 2
        if self.min_instances < zones:
            raise SettingsError(f"minInstances: {self.min_instances} is fewer than one per availability zone ({zones})")
        if self.max_instances < self.min_instances:
            raise SettingsError("maxInstances: below minInstances")

        # The NLB must see a drain (a 503 on /health) before splicegate stops
        # accepting: interval x unhealthy threshold < drain_grace.
        notice = self.health.interval * self.health.unhealthy
        if notice >= self.drain_grace:
            raise SettingsError(
                f"drainGraceSeconds: {self.drain_grace} s must exceed healthCheck.intervalSeconds x "
                f"unhealthyThreshold = {notice} s, or new clients reach an instance that no longer accepts"
            )
        if self.health.timeout >= self.health.interval:
            raise SettingsError("healthCheck.timeoutSeconds: must be below intervalSeconds")
        # Established sessions must outlive the drain on the NLB's side too.
        if self.deregistration_delay < self.drain_timeout:
            raise SettingsError(
                f"deregistrationDelaySeconds: {self.deregistration_delay} s is below drainTimeoutSeconds "
                f"{self.drain_timeout} s; the NLB would cut sessions splicegate still serves"
            )
        # The watcher's heartbeats must come before the hook times out, and
        # the wait it asks for must fit what Auto Scaling grants (48 h, and
        # at most 100 heartbeat timeouts).
        si = self.scale_in
        if si.heartbeat >= si.heartbeat_timeout:
            raise SettingsError(
                f"scaleIn.heartbeatSeconds: {si.heartbeat} s must be below heartbeatTimeoutSeconds "
                f"{si.heartbeat_timeout} s, or the hook times out while sessions are open"
            )
        if si.max_wait > 100 * si.heartbeat_timeout:
            raise SettingsError(
                f"scaleIn.maxWaitSeconds: {si.max_wait} s is more than 100 heartbeat timeouts "
                f"({100 * si.heartbeat_timeout} s), the longest Auto Scaling keeps an instance waiting"
            )
        if si.default_result not in ("CONTINUE", "ABANDON"):
            raise SettingsError(f"scaleIn.defaultResult: {si.default_result!r} is not CONTINUE or ABANDON")
        # Keepalives must reset the NLB's idle timer.
        if self.keepalive >= self.nlb_idle_timeout:
            raise SettingsError(
                f"keepaliveSeconds: {self.keepalive} s must be below nlbIdleTimeoutSeconds "
                f"{self.nlb_idle_timeout} s, or idle DCV sessions get a reset"
            )
        self._check_routes()
        self.binary_is_static = _check_elf(self.binary, ELF_MACHINES[self.architecture])

    def _check_routes(self) -> None:
        try:
            with open(self.routes, "rb") as f:
                doc = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise SettingsError(f"routes: {self.routes}: {e}") from e
        for table in STACK_TABLES:
            if table in doc:
                raise SettingsError(
                    f"routes: {self.routes} has [{table}]; the stack writes the listener, [admin] and "
                    "[shutdown] from config.json (drain and keepalive settings live there)"
                )
        for n in [a for rule in doc.get("agent_in_name", []) for a in rule.get("allow", [])]:
            net = ipaddress.ip_network(n, strict=False)
            if not any(net.subnet_of(ipaddress.ip_network(a)) for a in self.agent_networks if _same_family(net, a)):
                raise SettingsError(
                    f"routes: agent_in_name allows {n}, outside agentNetworks; the security group would drop it"
                )

    # -- what the stack renders ----------------------------------------------------

    def group_name(self) -> str:
        """The auto scaling group's name: the stack's, so that the hook,
        the instances' permissions and their watcher name it without a
        reference back to the group."""
        return f"{self.stack_name}-fleet"

    def lifecycle_env(self) -> str:
        """/etc/splicegate/lifecycle.env, one line a variable: what the
        watcher unit runs with (written with printf by user data)."""
        si = self.scale_in
        return (
            f"GROUP={self.group_name()}\nHOOK={LIFECYCLE_HOOK}\n"
            f"HEARTBEAT={si.heartbeat}s\nMAX={si.max_wait}s\n"
        )

    def timeout_stop_sec(self) -> int:
        """systemd's stop timeout: the whole drain, plus a margin to exit."""
        return self.drain_grace + self.drain_timeout + 30

    def splicegate_toml(self) -> str:
        """The complete /etc/splicegate/splicegate.toml the instances run."""
        with open(self.routes, encoding="utf-8") as f:
            routes = f.read().rstrip() + "\n"
        vpce = ", ".join(f'"{v}"' for v in self.allowed_vpce)
        lines = [
            "# Written by the splicegate CDK example (deploy/cdk): routes from",
            f"# {os.path.basename(self.routes)}, then what the NLB in front needs.",
            "",
            routes,
            "[[listener]]",
            'name = "dcv"',
            f'bind = ["0.0.0.0:{TRAFFIC_PORT}"]',
            'proxy_protocol = "v2"',
            "# The NLB's private addresses: every connection comes from one of them.",
            f'proxy_trusted = ["{self.vpc_cidr}"]',
        ]
        if self.allowed_vpce:
            lines.append(f"allowed_vpce = [{vpce}]")
        lines += [
            f'keepalive_time = "{self.keepalive}s"',
            "",
        ]
        if self.udp:
            lines += [
                "[[udp_listener]]",
                'name = "dcv-quic"',
                f'bind = ["0.0.0.0:{self.udp_port}"]',
                "# DCV's quic-port on the agents.",
                f"agent_port = {self.udp_port}",
                f"# Above the NLB's fixed {NLB_UDP_IDLE} s UDP flow timeout.",
                f'idle_timeout = "{UDP_IDLE_TIMEOUT}s"',
                "# Through PrivateLink the NLB's addresses are every datagram's source.",
                f'lb_networks = ["{self.vpc_cidr}"]',
                "",
            ]
        lines += [
            "[admin]",
            f'bind = "0.0.0.0:{ADMIN_PORT}"',
            "",
            "[shutdown]",
            f'drain_grace = "{self.drain_grace}s"',
            f'drain_timeout = "{self.drain_timeout}s"',
            "",
        ]
        return "\n".join(lines)


def _no_unknown(d: dict, known: set[str], prefix: str) -> None:
    if not isinstance(d, dict):
        raise SettingsError(f"{prefix.rstrip('.') or 'config'}: expected an object")
    for key in d:
        if key not in known:
            raise SettingsError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(known))})")


def _str(d: dict, key: str, default: str) -> str:
    v = d.get(key, default)
    if not isinstance(v, str) or not v:
        raise SettingsError(f"{key}: expected a non-empty string")
    return v


def _int(d: dict, key: str, default: int, lo: int, hi: int, prefix: str = "") -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise SettingsError(f"{prefix}{key}: expected an integer in {lo}..={hi}, got {v!r}")
    return v


def _cidr(v: object, key: str) -> str:
    try:
        return str(ipaddress.ip_network(str(v), strict=True))
    except ValueError as e:
        raise SettingsError(f"{key}: {e}") from e


def _same_family(net, other: str) -> bool:
    return net.version == ipaddress.ip_network(other).version


def _file(base: str, d: dict, key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v:
        raise SettingsError(f"{key}: expected a file path")
    p = v if os.path.isabs(v) else os.path.normpath(os.path.join(base, v))
    if not os.path.isfile(p):
        hint = " (build it first: see README.md)" if key == "binary" else ""
        raise SettingsError(f"{key}: {p} does not exist{hint}")
    return p


def _check_elf(path: str, machine: int) -> bool:
    """Refuse a binary for another architecture; say whether it is static."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise SettingsError(f"binary: {path} is not a 64-bit little-endian ELF executable")
        e_machine = int.from_bytes(head[18:20], "little")
        if e_machine != machine:
            raise SettingsError(f"binary: {path} is for ELF machine {e_machine:#x}, not the instances' {machine:#x}")
        phoff = int.from_bytes(head[32:40], "little")
        phentsize = int.from_bytes(head[54:56], "little")
        phnum = int.from_bytes(head[56:58], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    # PT_INTERP (3): the binary needs a dynamic loader and the system's libc.
    return not any(int.from_bytes(table[i * phentsize : i * phentsize + 4], "little") == 3 for i in range(phnum))
