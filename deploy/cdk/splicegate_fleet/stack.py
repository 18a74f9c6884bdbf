"""The NLB, its PrivateLink endpoint service and the auto-scaled splicegate fleet."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3_assets as s3_assets
from aws_cdk import custom_resources as cr
from constructs import Construct

from .settings import ADMIN_PORT, HEALTH_PATH, LIFECYCLE_HOOK, TRAFFIC_PORT, Settings

CONFIG_PATH = "/etc/splicegate/splicegate.toml"
# Heredoc delimiter around the config in user data (tests find it there).
CONFIG_MARK = "SPLICEGATE_CONFIG_EOF"
LIFECYCLE_ENV = "/etc/splicegate/lifecycle.env"


class SplicegateFleetStack(cdk.Stack):
    """One stack: VPC (new or existing), instances, NLB, endpoint service."""

    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        s = settings
        vpc, subnets = self._vpc(s)

        # -- instances -----------------------------------------------------------------
        sg = ec2.SecurityGroup(
            self,
            "InstanceSg",
            vpc=vpc,
            allow_all_outbound=False,
            description="splicegate: 8443 and 8989 from inside the VPC; out to the DCV agents only",
        )
        # The NLB's addresses are in the VPC; over PrivateLink (and with client IP
        # preservation off) every packet a target sees comes from them.
        sg.add_ingress_rule(ec2.Peer.ipv4(s.vpc_cidr), ec2.Port.tcp(TRAFFIC_PORT), "DCV traffic from the NLB")
        sg.add_ingress_rule(ec2.Peer.ipv4(s.vpc_cidr), ec2.Port.tcp(ADMIN_PORT), "health checks and /metrics")
        for net in s.agent_networks:
            peer = ec2.Peer.ipv4(net) if ":" not in net else ec2.Peer.ipv6(net)
            sg.add_egress_rule(peer, ec2.Port.tcp(TRAFFIC_PORT), f"DCV agents {net}")
        if s.udp:
            # QUIC: client IP preservation is always on for UDP target groups,
            # so datagrams come from the NLB's addresses over PrivateLink (in
            # the VPC) or from the clients themselves (udpClientNetworks).
            for net in [s.vpc_cidr, *s.udp_client_networks]:
                peer = ec2.Peer.ipv4(net) if ":" not in net else ec2.Peer.ipv6(net)
                sg.add_ingress_rule(peer, ec2.Port.udp(s.udp_port), f"DCV QUIC from {net}")
            for net in s.agent_networks:
                peer = ec2.Peer.ipv4(net) if ":" not in net else ec2.Peer.ipv6(net)
                sg.add_egress_rule(peer, ec2.Port.udp(s.udp_port), f"DCV agents' QUIC {net}")
        # The binary and unit come from the CDK asset bucket at boot, through
        # the S3 gateway endpoint: allow HTTPS to S3's prefix list, nothing else.
        sg.add_egress_rule(ec2.Peer.prefix_list(self._s3_prefix_list()), ec2.Port.tcp(443), "S3 (boot files)")

        binary = s3_assets.Asset(self, "Binary", path=s.binary)
        unit = s3_assets.Asset(self, "Unit", path=s.systemd_unit)
        watcher_unit = s3_assets.Asset(self, "LifecycleUnit", path=s.lifecycle_unit)
        if not s.binary_is_static:
            cdk.Annotations.of(self).add_warning_v2(
                "splicegate:dynamic-binary",
                f"{s.binary} is dynamically linked: Amazon Linux 2023 has glibc 2.34, so build with "
                "--target x86_64-unknown-linux-musl (or aarch64-unknown-linux-musl) as deploy/cdk/README.md says",
            )

        user_data = ec2.UserData.for_linux()
        user_data.add_commands("set -euo pipefail")
        bin_tmp = user_data.add_s3_download_command(
            bucket=binary.bucket, bucket_key=binary.s3_object_key, local_file="/tmp/splicegate"
        )
        unit_tmp = user_data.add_s3_download_command(
            bucket=unit.bucket, bucket_key=unit.s3_object_key, local_file="/tmp/splicegate.service"
        )
        watcher_tmp = user_data.add_s3_download_command(
            bucket=watcher_unit.bucket,
            bucket_key=watcher_unit.s3_object_key,
            local_file="/tmp/splicegate-lifecycle.service",
        )
        config = s.splicegate_toml()
        if any(line.strip() == CONFIG_MARK for line in config.splitlines()):
            raise ValueError(f"routes: a line may not be {CONFIG_MARK}")
        if s.udp:
            # The QUIC relay's 4 MiB socket buffers (docs/quic.md).
            user_data.add_commands(
                "printf 'net.core.rmem_max = 4194304\\nnet.core.wmem_max = 4194304\\n' "
                "> /etc/sysctl.d/90-splicegate.conf",
                "sysctl --system >/dev/null",
            )
        user_data.add_commands(
            f"install -m 0755 {bin_tmp} /usr/local/bin/splicegate",
            "id -u splicegate >/dev/null 2>&1 || "
            "useradd --system --no-create-home --shell /usr/sbin/nologin splicegate",
            "install -d -m 0755 /etc/splicegate",
            f"cat > {CONFIG_PATH} <<'{CONFIG_MARK}'\n{config}{CONFIG_MARK}",
            f"chmod 0644 {CONFIG_PATH}",
            # Refuse to start on a config splicegate would reject.
            f"/usr/local/bin/splicegate check --config {CONFIG_PATH}",
            f"install -m 0644 {unit_tmp} /etc/systemd/system/splicegate.service",
            # Let a shutdown wait for the whole drain configured above.
            "install -d -m 0755 /etc/systemd/system/splicegate.service.d",
            "printf '[Service]\\nTimeoutStopSec=%s\\n' "
            f"{s.timeout_stop_sec()} > /etc/systemd/system/splicegate.service.d/drain.conf",
            # The scale-in watcher: drains and holds the termination
            # lifecycle hook until the last session has ended.
            f"printf '{s.lifecycle_env()}' > {LIFECYCLE_ENV}",
            f"install -m 0644 {watcher_tmp} /etc/systemd/system/splicegate-lifecycle.service",
            "systemctl daemon-reload",
            "systemctl enable --now splicegate",
            "systemctl enable --now splicegate-lifecycle",
        )

        machine_image = ec2.MachineImage.latest_amazon_linux2023(
            cpu_type=ec2.AmazonLinuxCpuType.ARM_64 if s.architecture == "arm64" else ec2.AmazonLinuxCpuType.X86_64
        )
        role = iam.Role(self, "InstanceRole", assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"))
        template = ec2.LaunchTemplate(
            self,
            "LaunchTemplate",
            instance_type=ec2.InstanceType(s.instance_type),
            machine_image=machine_image,
            user_data=user_data,
            security_group=sg,
            role=role,
            require_imdsv2=True,
        )
        group = autoscaling.AutoScalingGroup(
            self,
            "Fleet",
            # A name of its own: the hook's permissions and the instances'
            # watcher name the group without a reference back to it.
            auto_scaling_group_name=s.group_name(),
            vpc=vpc,
            vpc_subnets=subnets,
            launch_template=template,
            min_capacity=s.min_instances,
            max_capacity=s.max_instances,
            # The ELB check replaces an instance whose /health keeps failing;
            # the grace covers boot and the S3 download.
            health_checks=autoscaling.HealthChecks.with_additional_checks(
                additional_types=[autoscaling.AdditionalHealthCheckType.ELB],
                grace_period=cdk.Duration.minutes(5),
            ),
        )
        binary.grant_read(role)
        unit.grant_read(role)
        watcher_unit.grant_read(role)
        group.scale_on_cpu_utilization("Cpu", target_utilization_percent=s.cpu_target_percent)

        # -- scale-in that waits for sessions -----------------------------------------
        # A terminating instance waits (Terminating:Wait) until its watcher
        # completes the action once the last session ended, extending the
        # wait with heartbeats; after heartbeatTimeoutSeconds without one
        # (the instance hung), Auto Scaling goes on with defaultResult.
        group.add_lifecycle_hook(
            "DrainOnScaleIn",
            lifecycle_hook_name=LIFECYCLE_HOOK,
            lifecycle_transition=autoscaling.LifecycleTransition.INSTANCE_TERMINATING,
            heartbeat_timeout=cdk.Duration.seconds(s.scale_in.heartbeat_timeout),
            default_result=autoscaling.DefaultResult[s.scale_in.default_result],
        )
        group_arn = cdk.Stack.of(self).format_arn(
            service="autoscaling",
            resource="autoScalingGroup",
            resource_name=f"*:autoScalingGroupName/{s.group_name()}",
            arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME,
        )
        # Its own policy, not the role's default one: the group depends on
        # the role, and this names the group.
        iam.Policy(
            self,
            "ScaleInPolicy",
            roles=[role],
            statements=[
                iam.PolicyStatement(
                    actions=[
                        "autoscaling:CompleteLifecycleAction",
                        "autoscaling:RecordLifecycleActionHeartbeat",
                    ],
                    resources=[group_arn],
                )
            ],
        )

        # -- NLB -----------------------------------------------------------------------
        nlb = elbv2.NetworkLoadBalancer(
            self,
            "Nlb",
            vpc=vpc,
            vpc_subnets=subnets,
            internet_facing=False,
            cross_zone_enabled=s.cross_zone,
        )
        target_group = elbv2.NetworkTargetGroup(
            self,
            "Targets",
            vpc=vpc,
            port=TRAFFIC_PORT,
            protocol=elbv2.Protocol.TCP,
            target_type=elbv2.TargetType.INSTANCE,
            # The real client and the VPC endpoint id reach splicegate only here.
            proxy_protocol_v2=True,
            # Packets come from the NLB's own addresses (in proxy_trusted), never
            # from clients that splicegate would not trust to send a header.
            preserve_client_ip=False,
            deregistration_delay=cdk.Duration.seconds(s.deregistration_delay),
            # At the end of the delay, keep what is left: at scale-in the
            # instance's watcher holds its termination until the sessions
            # end (or scaleIn.maxWaitSeconds), and a drain's own
            # drain_timeout ends them otherwise.
            connection_termination=False,
            health_check=elbv2.HealthCheck(
                enabled=True,
                protocol=elbv2.Protocol.HTTP,
                port=str(ADMIN_PORT),
                path=HEALTH_PATH,
                healthy_http_codes="200",
                interval=cdk.Duration.seconds(s.health.interval),
                timeout=cdk.Duration.seconds(s.health.timeout),
                healthy_threshold_count=s.health.healthy,
                unhealthy_threshold_count=s.health.unhealthy,
            ),
        )
        # A draining splicegate answers 503 on /health: the NLB must then stop
        # sending new flows but keep the established ones (its default closes
        # every connection of an unhealthy target at once) for as long as
        # splicegate serves them after SIGTERM: drain_grace + drain_timeout.
        target_group.set_attribute("target_health_state.unhealthy.connection_termination.enabled", "false")
        target_group.set_attribute(
            "target_health_state.unhealthy.draining_interval_seconds", str(s.drain_grace + s.drain_timeout)
        )
        target_group.add_target(group)

        nlb.add_listener(
            "Dcv",
            port=TRAFFIC_PORT,
            protocol=elbv2.Protocol.TCP,
            default_target_groups=[target_group],
            tcp_idle_timeout=cdk.Duration.seconds(s.nlb_idle_timeout),
        )

        if s.udp:
            # QUIC on a UDP listener of its own: the NLB's QUIC listeners route
            # by server ids a relay cannot put in the agent's connection ids,
            # and TCP_UDP would preserve client IPs on the TCP half too.
            quic_group = elbv2.NetworkTargetGroup(
                self,
                "QuicTargets",
                vpc=vpc,
                port=s.udp_port,
                protocol=elbv2.Protocol.UDP,
                target_type=elbv2.TargetType.INSTANCE,
                deregistration_delay=cdk.Duration.seconds(s.deregistration_delay),
                connection_termination=False,
                health_check=elbv2.HealthCheck(
                    enabled=True,
                    protocol=elbv2.Protocol.HTTP,
                    port=str(ADMIN_PORT),
                    path=HEALTH_PATH,
                    healthy_http_codes="200",
                    interval=cdk.Duration.seconds(s.health.interval),
                    timeout=cdk.Duration.seconds(s.health.timeout),
                    healthy_threshold_count=s.health.healthy,
                    unhealthy_threshold_count=s.health.unhealthy,
                ),
            )
            quic_group.add_target(group)
            nlb.add_listener(
                "Quic",
                port=s.udp_port,
                protocol=elbv2.Protocol.UDP,
                default_target_groups=[quic_group],
            )

        # -- PrivateLink ---------------------------------------------------------------
        service = ec2.VpcEndpointService(
            self,
            "EndpointService",
            vpc_endpoint_service_load_balancers=[nlb],
            acceptance_required=True,
            allowed_principals=[iam.ArnPrincipal(p) for p in s.allowed_principals],
        )

        cdk.CfnOutput(self, "EndpointServiceName", value=service.vpc_endpoint_service_name)
        cdk.CfnOutput(self, "NlbDnsName", value=nlb.load_balancer_dns_name)

    def _vpc(self, s: Settings) -> tuple[ec2.IVpc, ec2.SubnetSelection]:
        if s.vpc_id is None:
            vpc = ec2.Vpc(
                self,
                "Vpc",
                ip_addresses=ec2.IpAddresses.cidr(s.vpc_cidr),
                max_azs=2,
                nat_gateways=0,
                subnet_configuration=[
                    ec2.SubnetConfiguration(
                        name="splicegate", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED, cidr_mask=24
                    )
                ],
                gateway_endpoints={"S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3)},
            )
            return vpc, ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)
        vpc = ec2.Vpc.from_vpc_attributes(
            self,
            "Vpc",
            vpc_id=s.vpc_id,
            vpc_cidr_block=s.vpc_cidr,
            availability_zones=s.availability_zones,
            private_subnet_ids=s.private_subnet_ids,
            private_subnet_route_table_ids=s.route_table_ids or None,
        )
        selection = ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)
        if s.create_s3_endpoint:
            vpc.add_gateway_endpoint("S3", service=ec2.GatewayVpcEndpointAwsService.S3, subnets=[selection])
        return vpc, selection

    def _s3_prefix_list(self) -> str:
        """The id of the region's S3 managed prefix list, looked up at deploy time."""
        name = f"com.amazonaws.{cdk.Aws.REGION}.s3"
        call = cr.AwsSdkCall(
            service="EC2",
            action="describeManagedPrefixLists",
            parameters={"Filters": [{"Name": "prefix-list-name", "Values": [name]}]},
            physical_resource_id=cr.PhysicalResourceId.of(name),
            output_paths=["PrefixLists.0.PrefixListId"],
        )
        lookup = cr.AwsCustomResource(
            self,
            "S3PrefixList",
            on_create=call,
            on_update=call,
            policy=cr.AwsCustomResourcePolicy.from_sdk_calls(resources=cr.AwsCustomResourcePolicy.ANY_RESOURCE),
            install_latest_aws_sdk=False,
        )
        return lookup.get_response_field("PrefixLists.0.PrefixListId")
