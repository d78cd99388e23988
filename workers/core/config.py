"""The one experiment config tree: pydantic models loaded from YAML, overridable with `key.sub=value`.

This module imports only pydantic and yaml, so a bad config is rejected in well under a second,
before torch, Ray or hivemind are loaded.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from workers.core.errors import ConfigError
from workers.core.membership import read_swarm_key
from workers.core.storage import check_location, is_remote, local_path

logger = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    dataset: Literal["digits", "cifar10", "tinyimagenet"] = Field(
        "digits", description="digits (scikit-learn's, offline), cifar10, tinyimagenet"
    )
    root: Path = Field(
        Path("data"), description="holds cifar-10-batches-py/ or tiny-imagenet-200/; digits ships with scikit-learn"
    )
    download: bool = Field(
        False, description="fetch a missing dataset into `root` (needs internet on every peer's machine)"
    )
    download_timeout: PositiveFloat = Field(
        3600.0, description="seconds the download may take (the launcher's, before the peers start)"
    )
    batch_size: PositiveInt = Field(32, description="training batch size, per peer")
    test_batch_size: PositiveInt = Field(512, description="evaluation batch size, per peer")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="only for datasets without an official test split (digits)"
    )
    partition: Literal["iid", "dirichlet", "skewed"] = Field(
        "iid",
        description=(
            "how the training set is split among the peers: iid; dirichlet: each class's samples spread over the "
            "peers ~ Dirichlet(alpha) (shards of unequal size); skewed: each peer's class mix ~ Dirichlet(alpha), "
            "every shard the same size (synchronous methods take as many steps on every peer)"
        ),
    )
    dirichlet_alpha: PositiveFloat = Field(
        0.5, description="dirichlet, skewed: the Dirichlet's concentration: small = strong label skew"
    )
    augment: bool = Field(True, description="random crop + horizontal flip of training images (cifar10, tinyimagenet)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per peer")
    verify_checksums: bool = Field(
        True,
        description=(
            "cifar10: check every file's md5 against the official release (torchvision's check). Turn off only for "
            "copies that are re-packed or converted (same format, other bytes) and for tests' tiny generated files."
        ),
    )
    generate: int = Field(
        0,
        ge=0,
        description=(
            "cifar10 without the real set (offline machines, the bandwidth study): when `root` holds no CIFAR-10, "
            "write a generated one in its on-disk format with this many training images (a tenth as many test images);"
            " 0: never."
        ),
    )

    @model_validator(mode="after")
    def _generated_data_is_cifar10_without_checksums(self) -> DataConfig:
        if self.generate and self.dataset != "cifar10":
            raise ValueError(f"data.generate={self.generate} writes CIFAR-10 files: set data.dataset: cifar10")
        if self.generate and self.verify_checksums:
            raise ValueError(f"data.generate={self.generate}: generated files are not the official release; "
                             "set data.verify_checksums: false")  # fmt: skip
        return self


class ModelConfig(_Section):
    name: Literal["small_cnn", "cifar_cnn", "resnet50"] = Field(
        "small_cnn", description="small_cnn (digits), cifar_cnn, resnet50 (adapted to 64x64 inputs)"
    )
    channels_last: bool = Field(False, description="NHWC memory format on GPU (faster convolutions with AMP)")


class OptimConfig(_Section):
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="the local steps' (diloco: the inner) optimizer")
    lr: PositiveFloat = Field(0.05, description="the local optimizer's learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    weight_decay: float = Field(0.0, ge=0, description="the local optimizer's weight decay")
    epochs: PositiveInt = Field(
        10, description="in total: a resumed run trains from its checkpoint's epoch up to this one"
    )
    schedule: Literal["constant", "cosine", "step"] = Field(
        "constant",
        description=(
            "Learning rate per epoch (it changes between epochs, never within one): constant, cosine decay over the "
            "epochs after warmup, or step (multiplied by `gamma` every `step_size` epochs after warmup)."
        ),
    )
    step_size: PositiveInt = Field(30, description="step: epochs between decays")
    gamma: float = Field(0.1, gt=0, le=1, description="step: factor applied at each decay")
    warmup_epochs: int = Field(0, ge=0, description="linear ramp up to `lr` over the first epochs, before the schedule")
    amp: bool = Field(False, description="bf16 autocast for forward passes on GPU; ignored (with a log line) on CPU")

    @model_validator(mode="after")
    def _warmup_leaves_epochs(self) -> OptimConfig:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} leaves no epoch of epochs={self.epochs} after it")
        return self


class GossipConfig(_Section):
    method: Literal["gossip", "diloco", "sgp", "optimizer", "allreduce", "none"] = Field(
        "gossip",
        description=(
            "gossip: DecentralizedAverager every H steps; optimizer: hivemind.Optimizer; allreduce: torch.distributed "
            "exact mean over all peers (the baseline); none: no communication (the other baseline); diloco: gossip's "
            "rounds every H steps, each followed by an outer Nesterov step on the parameters of the last sync; sgp: "
            "Stochastic Gradient Push, every H steps one push-sum message to one peer of an exponential graph "
            "(docs/methods.md)"
        ),
    )
    group_size: int = Field(
        16, ge=2, description='target group size; a "group" of one is no averaging (use method: none)'
    )
    min_group_size: int = Field(2, ge=2, description="a round needs at least this many peers")
    alpha: float = Field(
        1.0, gt=0, le=1, description="averaging_alpha: step towards the group mean, 1.0 = take the mean"
    )
    matchmaking_time: PositiveFloat = Field(5.0, description="seconds a group leader waits for followers")
    every_steps: PositiveInt | Literal["epoch"] = Field(
        "epoch",
        description=(
            "average every H local steps, or once per epoch (sgp: round k = step // H, or the epoch's number, the same "
            "on every peer)"
        ),
    )
    round_timeout: PositiveFloat = Field(
        30.0,
        description=(
            "seconds an all-reduce may take after the group is formed; sgp: the longest a synchronous round waits for "
            "its incoming message, and a message's send"
        ),
    )
    allreduce_on: Literal["parameters", "gradients"] = Field(
        "parameters", description="allreduce: gradients every step = DP-SGD"
    )
    target_batch_size: PositiveInt | None = Field(
        None, description="optimizer: swarm samples per round (None: one swarm epoch)"
    )
    local_updates: bool = Field(
        True, description="optimizer: step on local gradients, average parameters every target batch"
    )
    background_averaging: bool = Field(
        False,
        description=(
            "optimizer: hivemind's delay_state_averaging. Off by default: in the background hivemind applies each "
            "round as a delta against the parameters of when the round began, so local drift during the round survives"
            " (README)."
        ),
    )
    overlap: bool = Field(
        False,
        description=(
            "gossip: run each round in the background while local steps go on; its result lands as a correction that "
            "keeps those steps (workers/averaging/gossip.py). At most one round in flight. sgp: the overlapped "
            "variant: a message is added when it arrives, and a round waits only when its peer is more than 2 rounds "
            "ahead of the peer that sends to it (docs/methods.md)."
        ),
    )
    compression: Literal["none", "float16", "uint8"] = Field(
        "none",
        description=(
            "gossip, diloco, sgp: hivemind's codec for the all-reduce parts (sgp: the messages' parts): none (float32),"
            " float16 (half the bytes), uint8 (a quarter)"
        ),
    )
    outer_lr: PositiveFloat = Field(
        0.7,
        description=(
            "diloco: the outer SGD (Nesterov) on the pseudo-gradient θ_sync − avg(θ) after each round "
            "(workers/averaging/diloco.py); outer_lr 1 with outer_momentum 0 is plain gossip averaging"
        ),
    )
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="diloco: the outer Nesterov momentum (0: plain SGD)")
    cheap_rounds: bool = Field(
        True,
        description=(
            "gossip, diloco: rounds that skip what hivemind's fixed cost a small swarm does not need (sticky groups, "
            "lean DHT use, one flat buffer; workers/averaging/levers.py). Off only to measure plain hivemind: the "
            "peers of a run must agree on it."
        ),
    )
    sticky_transport: Literal["gloo", "hivemind"] = Field(
        "gloo",
        description=(
            "gossip, diloco: once a matchmade group is the whole swarm, its rounds run through gloo (a process group "
            "of its members, in the peers' own processes: a round costs what the allreduce method's does; "
            "workers/averaging/gloo.py) or through hivemind (the group kept, its all-reduce through p2pd; "
            "workers/averaging/sticky.py). gloo only with compression none (it sends full precision). gloo's traffic "
            "is not authenticated (as the allreduce method's is not): a closed swarm on a network shared with "
            "untrusted hosts sets hivemind."
        ),
    )

    @model_validator(mode="after")
    def _min_not_above_target(self) -> GossipConfig:
        if self.min_group_size > self.group_size:
            raise ValueError(f"min_group_size={self.min_group_size} is larger than group_size={self.group_size}")
        return self

    @model_validator(mode="after")
    def _diloco_rounds_block(self) -> GossipConfig:
        """Unsupported rather than ignored: the outer step replaces the parameters with a step from θ_sync, so the
        local steps taken while an overlapped round was in flight would be lost."""
        if self.method == "diloco" and self.overlap:
            raise ValueError(
                "gossip.overlap=True is not supported with gossip.method='diloco' (its outer step replaces the "
                "parameters after each round): remove it, or use gossip.method=gossip"
            )
        return self

    @model_validator(mode="after")
    def _knobs_are_used_by_the_method(self) -> GossipConfig:
        """A knob the method ignores would still be recorded with the results, as if it had shaped them."""
        ignored = [
            f"gossip.{knob}={getattr(self, knob)!r}"
            for knob, (default, methods) in _METHOD_KNOBS.items()
            if self.method not in methods and self.method != "none" and getattr(self, knob) != default
        ]
        if self.method == "allreduce" and self.allreduce_on == "gradients" and self.every_steps != "epoch":
            ignored.append(f"gossip.every_steps={self.every_steps!r} (gradients are averaged at every step)")
        if ignored:
            raise ValueError(f"gossip.method={self.method!r} ignores {', '.join(ignored)}: remove it")
        return self


# A method-specific knob: its default and the methods that use it. `none` uses none of them, so it accepts any value
# (a sweep can compare it with any setting of the others).
_METHOD_KNOBS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "every_steps": ("epoch", ("gossip", "diloco", "sgp", "allreduce")),
    "allreduce_on": ("parameters", ("allreduce",)),
    "target_batch_size": (None, ("optimizer",)),
    "local_updates": (True, ("optimizer",)),
    "background_averaging": (False, ("optimizer",)),
    "overlap": (False, ("gossip", "sgp")),
    "compression": ("none", ("gossip", "diloco", "sgp")),
    "outer_lr": (0.7, ("diloco",)),
    "outer_momentum": (0.9, ("diloco",)),
    "cheap_rounds": (True, ("gossip", "diloco")),
    "sticky_transport": ("gloo", ("gossip", "diloco")),
}


class ResourcesConfig(_Section):
    num_cpus: PositiveFloat = Field(1.0, description="per peer; also the peer's torch thread count (at least 1)")
    num_gpus: float = Field(0.0, ge=0, description="per peer; a fraction packs several peers on one GPU")
    cap_cpu: bool = Field(
        False,
        description=(
            "hold each peer's processes (actor, hivemind's, p2pd) to num_cpus cores with a cgroup CPU quota, as if "
            "each had a machine of its own: a peer that waits leaves its share unused instead of speeding up the "
            "others, and a `slow` factor f divides the peer's quota by f, a machine f times slower "
            "(workers/core/cpucap.py; needs root)"
        ),
    )
    custom: dict[str, PositiveFloat] = Field(
        {}, description='extra Ray resources every peer needs, e.g. {"accelerator_type:H100": 0.01}'
    )
    peer_custom: list[dict[str, PositiveFloat]] = Field(
        [],
        description=(
            "Extra Ray resources per peer: entry i is added to peer i's bundle (pins peers to nodes that advertise "
            "them)."
        ),
    )
    placement: Literal["SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK"] | None = Field(
        None,
        description=(
            "How the placement group lays the peers' bundles out: SPREAD puts peers on different nodes when it can; "
            "None: PACK when peers share GPUs (0 < num_gpus < 1), else SPREAD."
        ),
    )
    placement_timeout: PositiveFloat = Field(
        120.0, description="seconds to wait for a feasible placement group to be scheduled"
    )

    @field_validator("num_gpus")
    @classmethod
    def _whole_gpus_above_one(cls, value: float) -> float:
        if value > 1 and not value.is_integer():
            raise ValueError("a peer takes a fraction of one GPU or a whole number of GPUs")
        return value

    @field_validator("custom", "peer_custom")
    @classmethod
    def _custom_is_not_cpu_or_gpu(cls, value):
        for resources in value if isinstance(value, list) else [value]:
            if reserved := sorted(set(resources) & {"CPU", "GPU", "memory", "object_store_memory"}):
                raise ValueError(f"{', '.join(reserved)}: set resources.num_cpus / num_gpus instead")
        return value


class NetworkConfig(_Section):
    host: str = Field(
        "auto",
        description=(
            'The interface the peers\' DHT listens on: "auto" is 127.0.0.1 when the Ray cluster has one node and '
            "0.0.0.0 (all interfaces) when it has several; or an IPv4 address."
        ),
    )
    announce_host: str | None = Field(
        None,
        description=(
            "The IPv4 address other peers dial; None: the peer's node IP when listening on 0.0.0.0, else `host`."
        ),
    )
    port: int = Field(
        0,
        ge=0,
        le=65535,
        description=(
            "Peer i listens on port + i (0: any free port); the allreduce baseline's rendezvous uses port + peers."
        ),
    )
    nat_traversal: bool = Field(
        False,
        description=(
            "p2pd's services for peers behind NAT on the internet: UPnP port mapping, AutoNAT and circuit relays. A "
            "launched swarm, whose peers dial each other directly, does without them (they cost each peer's start-up "
            "about 0.1 s of CPU)."
        ),
    )
    swarm_key_file: Path | None = Field(
        None,
        description=(
            "A file holding the swarm's secret key (64 hex digits); None: the launcher makes a new key for each run. "
            "Only peers holding the key take part (workers/averaging/admission.py); standalone peers joining a run by "
            "hand (`python -m workers --swarm_key FILE`) need this file."
        ),
    )

    @field_validator("swarm_key_file")
    @classmethod
    def _swarm_key_is_readable(cls, value: Path | None) -> Path | None:
        if value is not None:
            read_swarm_key(value)  # SwarmKeyError, a ValueError: named by the field
        return value.expanduser() if value is not None else None

    @field_validator("host")
    @classmethod
    def _host_is_auto_or_ipv4(cls, value: str) -> str:
        return value if value == "auto" else _ipv4(value)

    @field_validator("announce_host")
    @classmethod
    def _announce_host_is_dialable(cls, value: str | None) -> str | None:
        if value is not None and ipaddress.IPv4Address(_ipv4(value)).is_unspecified:
            raise ValueError("0.0.0.0 is where to listen, not an address other peers can dial")
        return value


def _ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError("expected an IPv4 address such as 10.0.0.5") from None


class LinkConfig(_Section):
    """One peer's link where it differs from `emulation`'s (heterogeneous links); unset fields keep those."""

    rate_mbit: PositiveFloat | None = Field(None, description="upload and download")
    up_mbit: PositiveFloat | None = Field(None, description="or each on its own (an asymmetric link)")
    down_mbit: PositiveFloat | None = None
    rtt_ms: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _rate_or_up_down(self) -> LinkConfig:
        if self.rate_mbit is not None and (self.up_mbit is not None or self.down_mbit is not None):
            raise ValueError("give rate_mbit (both directions) or up_mbit/down_mbit, not both")
        return self


MAX_EMULATED_PEERS = 250  # one /24 of namespace addresses, the hub's included


class EmulationConfig(_Section):
    """Bandwidth-limited links for peers on one machine (a private local Ray): each peer in a network namespace of
    its own whose upload and download are shaped, measured before training (launcher/emulation/links.py). Off: no
    rate."""

    rate_mbit: PositiveFloat | None = Field(None, description="every peer's upload and download, Mbit/s")
    rtt_ms: float = Field(
        0.0, ge=0, description="round trip between two peers of this link (half of it on each link); netem"
    )
    links: dict[int, LinkConfig] = Field({}, description="per peer index: where its link differs")

    @property
    def enabled(self) -> bool:
        return self.rate_mbit is not None

    @model_validator(mode="after")
    def _rate_is_set(self) -> EmulationConfig:
        if not self.enabled and (self.rtt_ms or self.links):
            given = "emulation.rtt_ms" if self.rtt_ms else "emulation.links"
            raise ValueError(f"{given} needs emulation.rate_mbit (every peer's link rate; links override it)")
        return self


class MetricsConfig(_Section):
    sketch_dim: int = Field(
        1024,
        ge=0,
        description=(
            "Consensus distance is computed from a CountSketch of each peer's parameters with this many buckets (seed "
            "shared by all peers); 0, or a model with at most this many parameters, sends them exactly."
        ),
    )
    tensorboard: bool = Field(
        True, description="event files in <run>/tensorboard/: one series per peer, and the swarm's"
    )
    tracking: Literal["none", "mlflow"] = Field(
        "none", description="mlflow: MLFLOW_TRACKING_URI, else <results>/mlflow.db"
    )


class FaultsConfig(_Section):
    """What the driver does when a peer dies, hangs or loses its hivemind processes."""

    max_restarts: int = Field(
        2, ge=0, description="per peer; past it the peer is given up and the run goes on without it"
    )
    stall_factor: float = Field(
        3.0,
        ge=1,
        description=(
            "A running peer whose training thread has made no progress (no step, no finished round) for "
            "max(stall_min_s, stall_factor x its longest epoch so far) is wedged: it is killed and restarted like a "
            "dead one."
        ),
    )
    stall_min_s: PositiveFloat = Field(60.0, description="the least time without progress that counts as a stall")
    poll_timeout_s: PositiveFloat = Field(
        10.0, description="a peer that does not answer a status poll this long is wedged too"
    )
    start_timeout_s: PositiveFloat = Field(
        300.0, description="loading data, building the model, starting the DHT, downloading state"
    )
    on_divergence: Literal["reload", "stop"] = Field(
        "reload",
        description=(
            "A peer whose loss or parameters are no longer finite shares nothing (its round is skipped) and then takes"
            " the swarm's state from a live peer and goes on (`reload`), or stops (`stop`: the driver restarts it as a"
            " death)."
        ),
    )


class ScenarioEvent(_Section):
    """One scripted churn event. `kill`: SIGKILL of the peer's process (then restarted within max_restarts);
    `leave`: the peer finishes its current epoch, stops, and is not restarted; `join`: a new peer joins the running
    swarm (it downloads the state first); `slow`: each of the peer's steps takes `factor` times longer; `lr`: the
    peer's learning rate is multiplied by `factor` from then on (e.g. a large one makes it diverge)."""

    event: Literal["kill", "leave", "join", "slow", "lr"]
    peer: int | None = Field(
        None, ge=0, description="kill, leave, slow: which peer (joiners are numbered peers, peers+1, ...)"
    )
    at_epoch: PositiveInt | None = Field(
        None, description="when that peer (for join: the swarm) has reported this epoch"
    )
    at_s: float | None = Field(None, ge=0, description="seconds after every peer started training")
    factor: float | None = Field(
        None, gt=0, description="slow: step time multiplier (> 1); lr: learning-rate multiplier"
    )
    process: Literal["peer", "dht"] = Field(
        "peer",
        description=(
            "kill: which process gets SIGKILL: the peer's own, or its hivemind DHT process (the peer lives on, wedged)"
        ),
    )

    @model_validator(mode="after")
    def _fields_fit_the_event(self) -> ScenarioEvent:
        if self.at_epoch is not None and self.at_s is not None:
            raise ValueError("give at_epoch or at_s, not both")
        if (self.peer is None) != (self.event == "join"):
            raise ValueError(f"{self.event}: " + ("a join takes no peer (the joiner gets the next free index)"
                                                  if self.event == "join" else "needs peer: N"))  # fmt: skip
        if (self.factor is None) != (self.event not in ("slow", "lr")):
            raise ValueError(f"{self.event} needs factor: F" if self.factor is None else
                             f"{self.event}: only slow and lr take a factor")  # fmt: skip
        if self.event == "slow" and self.factor <= 1:
            raise ValueError(f"slow: factor={self.factor} must be above 1 (a step takes factor times as long)")
        if self.process != "peer" and self.event != "kill":
            raise ValueError("process: only a kill names a process")
        if self.event in ("kill", "leave", "join") and self.at_epoch is None and self.at_s is None:
            raise ValueError(f"{self.event} needs at_epoch or at_s")
        return self


TRAIN_SET_SIZES = {"digits": 1797, "cifar10": 50_000, "tinyimagenet": 100_000}  # digits: before the test split


def train_set_size(data: DataConfig) -> int:
    """Training samples per epoch of the whole swarm (the peers' shards together)."""
    size = TRAIN_SET_SIZES[data.dataset]
    return size - int(round(size * data.test_fraction)) if data.dataset == "digits" else size  # as data.py splits


def steps_per_epoch(data: DataConfig, peers: int) -> int:
    """A peer's optimizer steps per epoch with an even share of the training set (IID; Dirichlet shards vary)."""
    return math.ceil(math.ceil(train_set_size(data) / peers) / data.batch_size)


class ExperimentConfig(_Section):
    name: str = Field("experiment", description="the run id's prefix (a config file's name: its stem)")
    peers: PositiveInt = Field(4, description="peers that start the run (one Ray actor each)")
    seed: int = Field(0, description="model initialisation (the same on every peer), data partition, batch orders")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    gossip: GossipConfig = GossipConfig()
    resources: ResourcesConfig = ResourcesConfig()
    network: NetworkConfig = NetworkConfig()
    emulation: EmulationConfig = Field(EmulationConfig(), description="shaped links for peers on one machine")
    metrics: MetricsConfig = MetricsConfig()
    storage: str = Field(
        "results",
        description=(
            "Where runs write their folders: a local folder or a URI of pyarrow.fs (s3://bucket/prefix, gs://...), "
            "whose endpoint and credentials come from the environment (AWS_ENDPOINT_URL, ...): workers/core/storage.py"
        ),
    )
    resume_from: Path | str | None = Field(
        None,
        description=(
            "A previous run's folder (or its checkpoint_dir), local or a storage URI, with peer-<i>_final.pt for every"
            " peer: each peer continues from its own checkpoint (model, optimizer, schedule, counters, RNG) up to "
            "optim.epochs."
        ),
    )
    checkpoint_dir: Path | None = Field(
        None, description="where peer-<i>_{best,final}.pt are written; None: the run's folder"
    )
    faults: FaultsConfig = FaultsConfig()
    scenario: list[ScenarioEvent] = Field(
        [], description="scripted churn: kills, leaves, joins, stragglers (Ray runs only)"
    )

    @property
    def joins(self) -> int:
        """Peers that join the running swarm (they get indices peers, peers + 1, ...)."""
        return sum(event.event == "join" for event in self.scenario)

    @field_validator("storage", "resume_from")
    @classmethod
    def _location_is_a_folder_or_known_uri(cls, value: Path | str | None, info: ValidationInfo) -> Path | str | None:
        """A remote URI stays a string (a Path would fold its `//`); a local resume_from is a Path, as it was."""
        if not isinstance(value, str):
            return value
        check_location(value)
        return value if is_remote(value) or info.field_name == "storage" else local_path(value)

    @model_validator(mode="after")
    def _peer_resources_match_peers(self) -> ExperimentConfig:
        if self.resources.peer_custom and len(self.resources.peer_custom) != self.peers:
            raise ValueError(
                f"resources.peer_custom has {len(self.resources.peer_custom)} entries but peers={self.peers}"
                " (one entry per peer, or none)"
            )
        if self.network.port and self.network.port + self.peers > 65535:
            raise ValueError(f"network.port={self.network.port} + peers={self.peers} is past 65535")
        return self

    @model_validator(mode="after")
    def _optimizer_rounds_can_happen(self) -> ExperimentConfig:
        """hivemind.Optimizer averages when the swarm has processed target_batch_size samples together: a target the
        whole run never reaches means no round at all."""
        target = self.gossip.target_batch_size
        if self.gossip.method == "optimizer" and target is not None:
            run_samples = train_set_size(self.data) * self.optim.epochs
            if target > run_samples:
                raise ValueError(
                    f"gossip.target_batch_size={target} is never reached: the whole swarm processes about "
                    f"{run_samples} samples in {self.optim.epochs} epochs of {self.data.dataset}, so "
                    "hivemind.Optimizer would never average"
                )
        return self

    @model_validator(mode="after")
    def _scenario_fits_the_swarm(self) -> ExperimentConfig:
        for number, event in enumerate(self.scenario):
            where = f"scenario.{number}"
            if event.peer is not None and event.peer >= self.peers + self.joins:
                raise ValueError(f"{where}.peer={event.peer}: the swarm has peers 0..{self.peers + self.joins - 1}")
            if event.at_epoch is not None and event.at_epoch >= self.optim.epochs:
                raise ValueError(f"{where}.at_epoch={event.at_epoch}: the run ends after epoch {self.optim.epochs}")
            if event.process == "dht" and self.gossip.method == "allreduce":
                raise ValueError(f"{where}.process=dht: the allreduce baseline uses no DHT (its collective goes "
                                 "through torch.distributed): kill its peer process instead")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _emulation_fits_the_swarm(self) -> ExperimentConfig:
        if not self.emulation.enabled:
            return self
        everyone = self.peers + self.joins
        if unknown := sorted(peer for peer in self.emulation.links if not 0 <= peer < everyone):
            raise ValueError(f"emulation.links.{unknown[0]}: the swarm has peers 0..{everyone - 1}")
        if everyone > MAX_EMULATED_PEERS:
            raise ValueError(f"emulation: {everyone} peers, at most {MAX_EMULATED_PEERS} (one /24 subnet)")
        if self.network.host != "auto" or self.network.announce_host:
            raise ValueError("emulation: each peer listens on and announces its own namespace's address: leave "
                             "network.host auto and network.announce_host unset")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _swarm_can_form_groups(self) -> ExperimentConfig:
        if self.gossip.method in ("gossip", "diloco", "optimizer") and self.gossip.min_group_size > self.peers:
            raise ValueError(
                f"gossip.min_group_size={self.gossip.min_group_size} can never be met by peers={self.peers}"
            )
        if self.gossip.method in ("gossip", "diloco", "optimizer") and self.gossip.min_group_size == self.peers > 2:
            logger.warning(
                "gossip.min_group_size=%d = peers: every round needs every peer, so after one peer dies (or falls "
                "behind by more than gossip.matchmaking_time) every round fails", self.peers,
            )  # fmt: skip
        return self

    @model_validator(mode="after")
    def _every_steps_leaves_rounds(self) -> ExperimentConfig:
        """Rounds come at every `every_steps`-th step of a peer's run: a run with fewer steps has none at all."""
        every = self.gossip.every_steps
        if every == "epoch" or self.gossip.method not in ("gossip", "diloco", "sgp", "allreduce"):
            return self
        per_epoch = steps_per_epoch(self.data, self.peers)
        if every > per_epoch * self.optim.epochs:
            raise ValueError(
                f"gossip.every_steps={every} is never reached: each peer takes about {per_epoch} steps per epoch "
                f"({train_set_size(self.data)} samples of {self.data.dataset} / peers={self.peers} / "
                f"data.batch_size={self.data.batch_size}), {per_epoch * self.optim.epochs} in optim.epochs="
                f"{self.optim.epochs}, so the run would have no averaging round"
            )
        return self


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `a.b.c=value` set; values are parsed as YAML scalars."""
    result = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        *parents, leaf = key.strip().split(".")
        node = result
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[leaf] = yaml.safe_load(text) if text.strip() else None
    return result


def _deep_copy(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


def dotted_get(tree: dict[str, Any], dotted_key: str) -> Any:
    """The value at `a.b.c` in a nested dict (e.g. a swept key's value as the config resolved it)."""
    node: Any = tree
    for part in dotted_key.split("."):
        node = node[part]
    return node


def flatten_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'gossip': {'alpha': 1.0}} -> {'gossip.alpha': 1.0}: a config as dotted keys (columns, parameters)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_keys(value, f"{name}."))
        else:
            flat[name] = value if value is None or isinstance(value, str | int | float | bool) else str(value)
    return flat


def parse_config(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for issue in err.errors():
        # pydantic adds a union member's tag to the location (every_steps.constrained-int): not a field name
        field = ".".join(str(p) for p in issue["loc"] if isinstance(p, int) or str(p).isidentifier()) or "config"
        if issue["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown key (value {issue['input']!r})")
        elif issue["type"] in ("value_error", "assertion_error") and not issue["loc"]:
            lines.append(issue["msg"].removeprefix("Value error, "))
        else:
            msg = issue["msg"].removeprefix("Value error, ")
            lines.append(f"{field}={_short(issue['input'])}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The YAML as a dict, `name` defaulting to the file's stem; not validated yet."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    raw.setdefault("name", path.stem)
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    raw = read_config_file(path)
    if "sweep" in raw:
        raise ConfigError(f"{path} has a `sweep:` section: it is a sweep, load it with launcher.sweep.grammar's "
                          "load_experiment")  # fmt: skip
    return parse_config(apply_overrides(raw, overrides or []))


def config_reference() -> str:
    """docs/config.md's table, from the fields' descriptions (`python -m workers.core.config`)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, spec in model.model_fields.items():
            if isinstance(spec.annotation, type) and issubclass(spec.annotation, BaseModel):
                walk(spec.annotation, f"{prefix}{name}.")
                continue
            default = "(required)" if spec.is_required() else f"`{_shown(spec.default)}`"
            lines.append(f"| `{prefix}{name}` | {default} | {spec.description or ''} |")

    walk(ExperimentConfig, "")
    return "\n".join(lines) + "\n"


def _shown(default: Any) -> str:
    """A default as it would be written in a config's YAML."""
    return (
        yaml.safe_dump(default if not isinstance(default, Path) else str(default), default_flow_style=True)
        .strip("\n.")
        .removesuffix("\n...")
    )


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


if __name__ == "__main__":
    print(config_reference(), end="")
