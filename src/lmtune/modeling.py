"""Load a pretrained model, or build a new one sized to a tokenizer; report its parameters."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from lmtune.config import FromScratchConfig, LoRAConfig, ModelConfig
from lmtune.errors import InputError
from lmtune.hub import from_pretrained_or_explain

log = logging.getLogger("lmtune")


def count_parameters(model: torch.nn.Module) -> dict[str, float]:
    if is_peft_model(model):  # peft's own count, as its print_trainable_parameters shows it
        trainable, total = model.get_nb_trainable_parameters()
        return {"total": total, "trainable": trainable, "trainable_percent": 100.0 * trainable / max(total, 1)}
    # Tied weights (GPT-2's embedding and output layer) are counted once.
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"total": total, "trainable": trainable, "trainable_percent": 100.0 * trainable / max(total, 1)}


def describe_parameters(counts: dict[str, float]) -> str:
    return (f"trainable params: {counts['trainable']:,} || all params: {counts['total']:,} || "
            f"trainable%: {counts['trainable_percent']:.4f}")


def max_positions(config) -> int | None:
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_block_size(config, block_size: int, where: str = "data.block_size") -> None:
    limit = max_positions(config)
    if limit is not None and block_size > limit:
        raise InputError(
            f"{where} {block_size} is larger than the model's context of {limit} positions; "
            f"set {where} to {limit} or less."
        )


def position_offset(config) -> int:
    # RoBERTa-style models spend padding_idx + 1 position slots before the first token.
    return 2 if config.model_type in {"roberta", "xlm-roberta", "camembert"} else 0


def check_sequence_fits(config, length: int, where: str) -> None:
    """`length` tokens must fit the model's positions, less those RoBERTa-style models reserve; the
    message names the setting and the largest value that fits."""
    limit = max_positions(config)
    offset = position_offset(config)
    if limit is None or length + offset <= limit:
        return
    usable = limit - offset
    reserved = f" ({limit} position slots, {offset} reserved by {config.model_type})" if offset else ""
    raise InputError(f"{where} {length} is larger than the model's context of {usable} positions"
                     f"{reserved}; set {where} to {usable} or less.")


def _common_ids(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def model_config_from_scratch(spec: FromScratchConfig, tokenizer, block_size: int):
    """A config whose vocabulary, special ids and context fit the tokenizer and the data."""
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

    positions = spec.n_positions or block_size
    common = _common_ids(tokenizer)
    inner = spec.intermediate_size or 4 * spec.n_embd
    if spec.architecture == "llama":
        return LlamaConfig(hidden_size=spec.n_embd, num_hidden_layers=spec.n_layer, num_attention_heads=spec.n_head,
                           num_key_value_heads=spec.n_head, intermediate_size=inner,
                           max_position_embeddings=positions, attention_dropout=spec.dropout,
                           tie_word_embeddings=True, **common)
    if spec.architecture in ("bert", "roberta"):
        cls = BertConfig if spec.architecture == "bert" else RobertaConfig
        # RoBERTa numbers positions from padding_idx + 1, so it needs two more position slots.
        extra = 2 if spec.architecture == "roberta" else 0
        return cls(hidden_size=spec.n_embd, num_hidden_layers=spec.n_layer, num_attention_heads=spec.n_head,
                   intermediate_size=inner, max_position_embeddings=positions + extra,
                   hidden_dropout_prob=spec.dropout, attention_probs_dropout_prob=spec.dropout, **common)
    return GPT2Config(n_embd=spec.n_embd, n_layer=spec.n_layer, n_head=spec.n_head, n_positions=positions,
                      resid_pdrop=spec.dropout, embd_pdrop=spec.dropout, attn_pdrop=spec.dropout,
                      activation_function=FUSED_ACTIVATIONS["gelu_new"], **common)


# GPT-2's `gelu_new` is the tanh approximation of GELU written as five elementwise kernels; PyTorch's
# `gelu(approximate="tanh")` is the same function in one (equal within float rounding, tested). On the
# demo's model the step is 1.13x as fast with it (benchmarks/README.md).
FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}


def fused_activation(config) -> dict:
    """Config overrides that give a pretrained model the one-kernel form of its activation."""
    act = getattr(config, "activation_function", None)
    return {"activation_function": FUSED_ACTIVATIONS[act]} if act in FUSED_ACTIVATIONS else {}


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping); None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits_in_memory(config, where: str = "model.from_scratch") -> None:
    """A new model's weights, gradients and Adam's two moments (16 bytes a parameter in fp32) must fit the
    memory this machine has free, checked on the config before anything is allocated."""
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    inner = getattr(config, "intermediate_size", None) or 4 * width
    positions = max_positions(config) or 0
    params = layers * (4 * width * width + 2 * width * inner) + (config.vocab_size + positions) * width
    need, free = 16 * params, available_memory_bytes()
    if free is not None and need > free:
        raise InputError(f"{where}: a model of about {params / 1e6:,.0f}M parameters needs about {need / 2**30:,.1f} "
                         f"GiB to train (weights, gradients, optimizer state), and this machine has "
                         f"{free / 2**30:,.1f} GiB free; make it smaller (n_layer, n_embd).")


def build_from_scratch(spec: FromScratchConfig, tokenizer, block_size: int, seed: int, task: str = "clm",
                       **head_config):
    import transformers
    from transformers import set_seed

    set_seed(seed)
    config = model_config_from_scratch(spec, tokenizer, block_size)
    check_fits_in_memory(config)
    for key, value in head_config.items():  # num_labels, id2label, ... of a classification head
        setattr(config, key, value)
    config._attn_implementation = "sdpa"
    return getattr(transformers, HEADS[task][0]).from_config(config)


HEADS = {
    # task: (auto class name, mapping of model types that have the head, what the head is called)
    "clm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "causal-LM", "a decoder such as gpt2"),
    "mlm": ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "masked-LM",
            "an encoder such as bert or roberta"),
    "qa": ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "question-answering",
           "an encoder such as bert or roberta"),
    "sft": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "causal-LM", "a decoder such as gpt2"),
    "classify": ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                 "sequence-classification", "an encoder such as distilbert or bert, or a decoder such as gpt2"),
}
HEADS["reward"] = HEADS["classify"]  # a reward model is a one-output sequence classifier
HEADS["dpo"] = HEADS["rl"] = HEADS["sft"]


def check_pretrained_head(model_cfg: ModelConfig, task: str) -> None:
    """A pretrained model must be able to carry the task's head; checked first, on its config alone
    (a decoder's folder comes with a tokenizer without a mask token, which would otherwise be blamed)."""
    if model_cfg.name_or_path is None or model_cfg.trust_remote_code:
        return
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    _, mapping_name, head, example = HEADS[task]
    name = model_cfg.name_or_path
    config = from_pretrained_or_explain(AutoConfig.from_pretrained, name, what="model")
    if config.model_type not in getattr(modeling_auto, mapping_name):
        raise InputError(f"model '{name}' ({config.model_type}) has no {head} head; choose {example}.")


def load_pretrained(model_cfg: ModelConfig, task: str = "clm", **head_config):
    """A pretrained model with the task's head (a missing head, e.g. MLM on a plain encoder, is created
    new by transformers and trained)."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    auto_name, mapping_name, head, example = HEADS[task]
    name = model_cfg.name_or_path
    config = from_pretrained_or_explain(AutoConfig.from_pretrained, name, what="model",
                                        trust_remote_code=model_cfg.trust_remote_code)
    if config.model_type not in getattr(modeling_auto, mapping_name) and not model_cfg.trust_remote_code:
        raise InputError(f"model '{name}' ({config.model_type}) has no {head} head; choose {example}.")
    if model_cfg.trust_remote_code:
        log.warning("trust_remote_code is on: code shipped with '%s' will run on this machine", name)
    overrides = {} if model_cfg.trust_remote_code else fused_activation(config)
    return from_pretrained_or_explain(getattr(transformers, auto_name).from_pretrained, name, what="model",
                                      trust_remote_code=model_cfg.trust_remote_code, **overrides, **head_config)


def build_or_load(model_cfg: ModelConfig, tokenizer, length: int, seed: int, task: str, **head_config):
    """The task's model: new from `model_cfg.from_scratch` sized to the tokenizer and `length`, or
    pretrained, its embeddings grown when the tokenizer has more tokens (added pad token). Seeded
    either way: a new task head (and LoRA adapters added next) start the same in every run."""
    from transformers import set_seed

    set_seed(seed)
    if model_cfg.from_scratch is not None:
        return build_from_scratch(model_cfg.from_scratch, tokenizer, length, seed, task, **head_config)
    model = load_pretrained(model_cfg, task, **head_config)
    grow_embeddings(model, len(tokenizer))
    return model


def grow_embeddings(model, vocab_size: int) -> None:
    """Room for tokens the tokenizer added (a pad token): new rows are the mean of the old ones, the
    same every time (transformers' default samples them), so a LoRA adapter -- which does not store
    the embeddings -- can later be merged into a freshly loaded base with identical results."""
    old = model.get_input_embeddings().num_embeddings
    if vocab_size <= old:
        return
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight[old:] = weight[:old].mean(dim=0, keepdim=True)
        out = model.get_output_embeddings()
        if out is not None and out.weight is not weight and out.weight.shape[0] == vocab_size:
            out.weight[old:] = out.weight[:old].mean(dim=0, keepdim=True)


# Masked LMs whose prediction head works position by position on the encoder's output, checked by
# tests/unit/test_fast_path.py: their head may be run on the masked positions alone.
POSITIONWISE_MLM_HEADS = {"bert", "roberta", "distilbert", "xlm-roberta", "camembert"}


def encoder_of_masked_lm(model):
    """The encoder whose output a masked LM's head reads, or None where the head must see every
    position (a kind of model not checked)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "model_type", None) not in POSITIONWISE_MLM_HEADS:
        return None
    encoder = getattr(base, base.base_model_prefix, None)
    return encoder if isinstance(encoder, torch.nn.Module) else None


@contextmanager
def head_only_at(encoder, selector: torch.Tensor):
    """Within it, the model's head sees only the encoder outputs where `selector` [batch, length] is
    True, as [selected, width] rows, so its logits are [selected, vocabulary]: a masked LM predicts 15 %
    of its positions, and its output layer (vocabulary x width per position) is up to half the work of
    a step for a small encoder. The model is still called whole (through a DDP wrapper, which must see
    every forward pass)."""

    def keep_selected(module, args, output):
        output.last_hidden_state = output.last_hidden_state[selector]
        return output

    hook = encoder.register_forward_hook(keep_selected)
    try:
        yield
    finally:
        hook.remove()


# --------------------------------------------------------------------------------------------------
# Training modes: full, head (base frozen), lora (peft adapters)

# The LoRA article adapts DistilBERT's q_lin; peft's own table covers many more architectures.
LORA_TARGETS = {"distilbert": ["q_lin"], "bert": ["query", "value"], "roberta": ["query", "value"],
                "gpt2": ["c_attn"]}
# Llama-style decoders (Llama, Mistral, Qwen, Gemma name their projections alike): every linear projection
# of attention and MLP. Measured on SmolLM2-135M instruction tuning (benchmarks/lora_targets.py, r 16, fp32):
# trained for the same 3.7 minutes, all projections reached a held-out reply loss of 0.827 against 0.869 for
# q/v only (88 steps to 60; from 1.398), for 1.3 GB more peak memory (4.7 against 3.5 GB).
LLAMA_STYLE_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS |= dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"],
                              LLAMA_STYLE_PROJECTIONS)
PEFT_TASK_TYPES = {"clm": "CAUSAL_LM", "sft": "CAUSAL_LM", "dpo": "CAUSAL_LM", "rl": "CAUSAL_LM",
                   "classify": "SEQ_CLS", "reward": "SEQ_CLS", "qa": "QUESTION_ANS", "mlm": None}
NEW_HEAD_TASKS = ("classify", "reward", "qa")


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_nb_trainable_parameters")


def head_module_names(model) -> list[str]:
    """The task head: the model's children that hold parameters, other than its base model
    (DistilBERT: pre_classifier, classifier; GPT-2: score), and the base model's pooler where it has
    one (BERT: bert.pooler, the dense layer over [CLS] that only classification uses -- the counterpart
    of DistilBERT's pre_classifier)."""
    prefix = getattr(model, "base_model_prefix", "")
    names = [name for name, module in model.named_children()
             if name != prefix and any(True for _ in module.parameters())]
    pooler = getattr(getattr(model, prefix, None), "pooler", None)
    if isinstance(pooler, torch.nn.Module) and any(True for _ in pooler.parameters()):
        names.append(f"{prefix}.pooler")
    return names


def linear_module_names(model) -> list[str]:
    """Names (last component) of the modules LoRA can adapt: Linear, and GPT-2's Conv1D."""
    kinds = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds = (torch.nn.Linear, Conv1D)
    except ImportError:
        pass
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, kinds)})


def freeze_base(model) -> None:
    """Everything but the head (`head_module_names`) stops learning."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if base is None or base is model:
        raise InputError(f"cannot tell the base of a {type(model).__name__} from its head; use training.mode full "
                         "or lora.")
    head = tuple(f"{name}." for name in head_module_names(model))
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(head))


def lora_target_modules(model, lora: LoRAConfig) -> list[str]:
    names = linear_module_names(model)
    targets = lora.target_modules or LORA_TARGETS.get(model.config.model_type)
    if targets is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

        targets = PEFT_TARGETS.get(model.config.model_type)
    if not targets:
        raise InputError(f"no default LoRA target modules for {model.config.model_type}; set lora.target_modules "
                         f"to some of its linear modules: {', '.join(names)}.")
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise InputError(f"lora.target_modules {', '.join(unknown)} not found in {model.config.model_type}; its "
                         f"linear modules are: {', '.join(names)}.")
    return list(targets)


def add_lora(model, lora: LoRAConfig, task: str):
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, lora)
    to_save = lora.modules_to_save if lora.modules_to_save is not None else (
        head_module_names(model) if task in NEW_HEAD_TASKS else None)
    modules = {n for n, _ in model.named_modules()}
    missing = [m for m in (to_save or []) if not any(n == m or n.endswith("." + m) for n in modules)]
    if missing:
        raise InputError(f"lora.modules_to_save {', '.join(missing)} not found in {model.config.model_type}; "
                         f"its head modules are: {', '.join(head_module_names(model)) or '(none)'}.")
    # GPT-2's Conv1D stores its weight transposed; peft must be told (it warns and guesses otherwise).
    conv1d = any(type(m).__name__ == "Conv1D" for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
    config = LoraConfig(task_type=PEFT_TASK_TYPES.get(task), r=lora.r, lora_alpha=lora.alpha,
                        lora_dropout=lora.dropout, target_modules=targets, modules_to_save=to_save or None,
                        fan_in_fan_out=conv1d)
    return get_peft_model(model, config)


def apply_training_mode(model, mode: str, lora: LoRAConfig, task: str):
    """full: unchanged; head: the base model frozen, its new head trained (transfer learning); lora: a
    peft model whose base weights stay frozen, with adapters (and the new head) trained."""
    if mode == "head":
        freeze_base(model)
        return model
    if mode == "lora":
        return add_lora(model, lora, task)
    return model


def merge_adapter(run_dir, model_cfg: ModelConfig, task: str):
    """The run's LoRA adapter folded into a freshly loaded base model: a plain transformers model."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoTokenizer

    trained = AutoConfig.from_pretrained(str(run_dir / "model"))
    head_config = {}
    if task in ("classify", "reward"):
        head_config = {k: getattr(trained, k) for k in ("num_labels", "id2label", "label2id", "problem_type")}
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "adapter"))
    base = load_pretrained(model_cfg, task, **head_config)
    grow_embeddings(base, len(tokenizer))
    base.config.pad_token_id = trained.pad_token_id
    merged = PeftModel.from_pretrained(base, str(run_dir / "adapter")).merge_and_unload()
    return merged, tokenizer
