"""The Accelerate configs shipped in accelerate_configs/, read by Accelerate's own code.

No GPU here, so nothing is launched: each file goes through what `accelerate launch --config_file`
does before it starts processes (load and check the file, merge it into the launch arguments, build
the launched processes' environment), and the FSDP / DeepSpeed plugins are then built from that
environment as every launched process builds them. A misspelt key or a value Accelerate refuses
fails here. DeepSpeed itself is not needed (nor installed): only Accelerate's side is checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from ..helpers import REPO

CONFIGS = REPO / "accelerate_configs"
EXPECTED = {
    "ddp.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
    "deepspeed-zero2.yaml": DistributedType.DEEPSPEED,
    "deepspeed-zero3.yaml": DistributedType.DEEPSPEED,
}


def launch(config: Path, *extra: str):
    """`accelerate launch --config_file CONFIG [extra] -m lmtune train recipe.yaml`, up to (not including)
    starting the processes: the parsed and validated arguments, the config, and the environment the
    launched processes would get. Port 0: the launcher picks a free one (none is bound)."""
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(config), "--main_process_port", "0", *extra,
                              "-m", "lmtune", "train", "recipe.yaml"])
    args, config_obj, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        # what launch_command sets before calling the DeepSpeed launcher
        fields = list(config_obj.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, config_obj, env


def launcher_option_names() -> set[str]:
    return set(vars(launch_command_parser().parse_args(["script.py"])))


def use_env(monkeypatch, env: dict) -> None:
    """The launched processes' Accelerate / FSDP variables in this process, undone after the test."""
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)


def test_the_folder_holds_exactly_the_documented_configs():
    assert sorted(p.name for p in CONFIGS.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerate_and_says_how_to_launch(name):
    path = CONFIGS / name
    config = load_config_from_file(str(path))  # refuses unknown top-level keys
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == EXPECTED[name]
    assert config.num_machines == 1 and config.num_processes == 8 and config.mixed_precision == "bf16"
    assert not config.use_cpu
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert f"#   accelerate launch --config_file accelerate_configs/{name} -m lmtune train RECIPE" in header


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launcher_accepts_config_and_num_processes_override(name):
    args, config, env = launch(CONFIGS / name)
    assert args.num_processes == 8 and args.nproc_per_node == "8"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (
        name == "ddp.yaml", name == "fsdp.yaml", name.startswith("deepspeed"))
    assert args.module and args.training_script == "lmtune"
    assert args.training_script_args == ["train", "recipe.yaml"]
    # --num_processes on the command line wins over the file (what the README tells users to do)
    args, _, _ = launch(CONFIGS / name, "--num_processes", "2")
    assert args.num_processes == 2 and args.nproc_per_node == "2"


@pytest.mark.parametrize("name,section", [("fsdp.yaml", "fsdp_config"), ("deepspeed-zero2.yaml", "deepspeed_config"),
                                          ("deepspeed-zero3.yaml", "deepspeed_config")])
def test_every_plugin_key_is_a_launcher_option(name, section):
    """The launcher copies a section's keys onto its arguments without checking them, so a misspelt key
    would be silently ignored; every key must be one of `accelerate launch`'s own options."""
    keys = set(yaml.safe_load((CONFIGS / name).read_text())[section])
    assert keys and keys <= launcher_option_names(), keys - launcher_option_names()


def test_fsdp_plugin_builds_from_the_launch_environment(monkeypatch):
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp import StateDictType
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    args, config, env = launch(CONFIGS / "fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    use_env(monkeypatch, env)
    plugin = FullyShardedDataParallelPlugin()  # what each launched process's Accelerator builds
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FULL_SHARD
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.activation_checkpointing is False
    assert plugin.use_orig_params is None  # FSDP2 always trains the original parameters
    assert plugin.transformer_cls_names_to_wrap is None  # taken from the model's _no_split_modules
    # Transformer-based wrapping of a real (tiny) GPT-2: exactly its blocks become FSDP units.
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2, n_positions=16))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [m for m in model.modules() if policy(m)]
    assert len(wrapped) == 3 and all(isinstance(m, GPT2Block) for m in wrapped)


@pytest.mark.parametrize("name,stage", [("deepspeed-zero2.yaml", 2), ("deepspeed-zero3.yaml", 3)])
def test_deepspeed_plugin_builds_from_the_launch_environment(monkeypatch, name, stage):
    from accelerate.utils import DeepSpeedPlugin

    args, config, env = launch(CONFIGS / name)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    use_env(monkeypatch, env)
    plugin = DeepSpeedPlugin()  # what each launched process builds (no deepspeed import needed)
    ds = plugin.deepspeed_config
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert ds["zero_optimization"]["offload_param"]["device"] == "none"
    # Left to the Trainer, which fills them from the recipe (max_grad_norm, gradient_accumulation_steps,
    # batch_size), so the config can never contradict the recipe.
    assert ds["gradient_clipping"] == "auto" and ds["gradient_accumulation_steps"] == "auto"
    assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["train_batch_size"] == "auto"
    assert plugin.zero3_init_flag is False
    # ZeRO-3 gathers the sharded weights into one 16-bit state dict when the model is saved.
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)


def test_configs_mixed_precision_is_the_fallback_when_the_recipe_resolves_to_fp32(monkeypatch, tmp_path):
    """What the README says about precision: with bf16/fp16 off in TrainingArguments (the recipe's
    precision resolved to fp32), transformers takes the launcher's mixed precision."""
    from transformers import TrainingArguments

    _, _, env = launch(CONFIGS / "ddp.yaml")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env["ACCELERATE_MIXED_PRECISION"])
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert args.mixed_precision == "bf16"
