"""Typed recipe schema, validated at load.

Precedence: schema defaults < recipe YAML < ``--set key=value`` overrides. Unknown keys are rejected
with the closest valid name; every problem is reported in one message.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmtune.errors import InputError

DEFAULT_CODE_KEYWORDS = ["pandas", "sklearn", "matplotlib", "seaborn"]


# Upper bounds that any real run stays far below: a value past them is a typo or an overflow, refused at load
# instead of crashing (or trying to allocate terabytes) later.
MAX_TOKENS = 1_048_576  # a sequence, block, window or generation length
MAX_VOCAB = 4_194_304  # Gemma's is 262,144
MAX_COUNT = 10**12  # examples, blocks, documents
MAX_STEPS = 10**10
MAX_BATCH = 1_048_576
MAX_SEED = 2**32 - 1  # numpy's seeds


class Section(BaseModel):
    # allow_inf_nan: inf and nan are never a setting (`.inf` in YAML passed every `gt=0` before).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SourceConfig(Section):
    """Where raw documents come from."""

    type: Literal["auto", "files", "hub", "python-code"] = "auto"
    path: str | list[str] | None = Field(
        None, description="File, folder, glob (or a list of them), or a Hub dataset id."
    )
    text_field: str = Field("text", description="Field holding the text; dotted for nested ('answers.text').")
    txt_unit: Literal["file", "line", "paragraph"] = Field(
        "file", description="For .txt files: one document per file, per line, or per blank-line paragraph."
    )
    split: str = Field("train", description="Hub split, slicing allowed: 'train[:5000]'.")
    config_name: str | None = Field(None, description="Hub dataset configuration (subset).")
    match: dict[str, str | int | float | bool] | None = Field(
        None, description="Keep only records whose fields equal these values, e.g. {split: train}.")
    keywords: list[str] = Field(default_factory=list, description="Keep only documents mentioning them.")
    keyword_mode: Literal["any", "none"] = Field(
        "any", description="'any': keep documents containing a keyword; 'none': keep those containing none."
    )
    roots: list[Literal["stdlib", "site-packages"]] = Field(
        default_factory=lambda: ["stdlib", "site-packages"], description="python-code: where to harvest .py files."
    )
    max_documents: int | None = Field(None, gt=0, le=MAX_COUNT)
    streaming: bool = False

    @model_validator(mode="after")
    def _check(self) -> SourceConfig:
        if self.type != "python-code" and not self.path:
            raise ValueError("a path (file, folder, glob or Hub id) is required unless type is 'python-code'")
        if self.type == "python-code" and not self.keywords and self.keyword_mode == "any":
            self.keywords = list(DEFAULT_CODE_KEYWORDS)
        return self

    @property
    def paths(self) -> list[str]:
        if self.path is None:
            return []
        return [self.path] if isinstance(self.path, str) else list(self.path)


class DataConfig(Section):
    train: SourceConfig
    validation: SourceConfig | None = None
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="Held out when no validation source is given.")
    split_seed: int = Field(42, ge=0, le=MAX_SEED)
    block_size: int = Field(128, ge=2, le=MAX_TOKENS)
    packing: Literal["concat", "overflow"] = Field(
        "concat",
        description="'concat': join documents (EOS between) and cut into blocks; "
        "'overflow': per-document chunks, only full-length ones kept.",
    )
    max_train_blocks: int | None = Field(None, gt=0, le=MAX_COUNT, description="A seeded random subset of training blocks.")
    max_validation_blocks: int | None = Field(None, gt=0, le=MAX_COUNT)
    shuffle_buffer: int = Field(
        8192, ge=0, le=MAX_COUNT, description="Streaming (data.train.streaming): blocks are shuffled in windows of this many, "
        "seeded by training.seed and the epoch (files are read in a shuffled order too); 0 keeps the stream's order.")


CAUSAL_ARCHITECTURES = ("gpt2", "llama")
MASKED_ARCHITECTURES = ("bert", "roberta")


class FromScratchConfig(Section):
    architecture: Literal["gpt2", "llama", "bert", "roberta"] = "gpt2"
    n_layer: int = Field(4, ge=1, le=1024)
    n_head: int = Field(4, ge=1, le=1024)
    n_embd: int = Field(256, ge=8, le=65536)
    n_positions: int | None = Field(None, ge=2, le=MAX_TOKENS, description="Context length; defaults to data.block_size.")
    intermediate_size: int | None = Field(None, ge=8, le=1_048_576, description="Llama/BERT/RoBERTa; defaults to 4*n_embd.")
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide(self) -> FromScratchConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class ModelConfig(Section):
    name_or_path: str | None = Field(None, description="Pretrained Hub id or local folder.")
    from_scratch: FromScratchConfig | None = None
    tokenizer: str | None = Field(None, description="Tokenizer id/folder when it differs from the model's.")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_origin(self) -> ModelConfig:
        if (self.name_or_path is None) == (self.from_scratch is None):
            raise ValueError("set exactly one of model.name_or_path (pretrained) and model.from_scratch")
        return self


class TokenizerConfig(Section):
    """Train a new tokenizer on the training corpus: byte-level BPE (GPT-2, Llama, RoBERTa) or
    WordPiece (BERT), after model.from_scratch.architecture."""

    train: bool = False
    vocab_size: int = Field(8192, le=MAX_VOCAB, description="Includes the 256 byte symbols and the special tokens.")
    min_frequency: int = Field(2, ge=1, le=MAX_COUNT)
    max_training_bytes: int | None = Field(None, gt=0, le=10**13, description="Train on at most this much text.")

    @model_validator(mode="after")
    def _vocab_large_enough(self) -> TokenizerConfig:
        from lmtune.tokenizer import MIN_VOCAB_SIZE

        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size {self.vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB_SIZE} "
                "(256 bytes + special tokens); use e.g. 8192"
            )
        return self


class LossConfig(Section):
    type: Literal["cross_entropy", "keytoken"] = "cross_entropy"
    keywords: list[str] = Field(
        default_factory=lambda: ["plt", "pd", "sk", "fit", "predict", " plt", " pd", " sk", " fit", " predict"],
        description="keytoken: words whose single-token ids up-weight a sample.",
    )
    alpha: float = Field(1.0, gt=0, le=1e6)


class MLMConfig(Section):
    """Masking for task mlm, done by transformers' DataCollatorForLanguageModeling."""

    mlm_probability: float = Field(0.15, gt=0, lt=1)
    mask_replace_prob: float = Field(0.8, ge=0, le=1, description="Share of chosen tokens replaced by the mask.")
    random_replace_prob: float = Field(0.1, ge=0, le=1, description="Share replaced by a random token.")
    whole_word_mask: bool = Field(False, description="Mask every sub-token of a chosen word together.")
    last_chunk: Literal["drop", "pad"] = Field("drop", description="The short last chunk: dropped or padded.")
    eval_mask_seed: int = Field(1234, ge=0, le=MAX_SEED, description="The evaluation set is masked once, with this seed.")

    @model_validator(mode="after")
    def _shares(self) -> MLMConfig:
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise ValueError("mask_replace_prob + random_replace_prob must not exceed 1")
        return self


class QASample(Section):
    question: str = Field(..., min_length=1)
    context: str = Field(..., min_length=1)


class QAConfig(Section):
    """Extractive question answering (task qa): windows over long contexts and n-best answers."""

    max_length: int = Field(384, ge=16, le=MAX_TOKENS, description="Tokens per window: question + context + special tokens.")
    stride: int = Field(128, ge=0, le=MAX_TOKENS, description="Tokens shared by consecutive windows of one context.")
    n_best: int = Field(20, ge=1, le=10000, description="Start and end candidates per window.")
    max_answer_length: int = Field(30, ge=1, le=MAX_TOKENS, description="Longest answer, in tokens.")
    version_2: bool = Field(False, description="SQuAD v2: questions may have no answer (the empty answer).")
    null_score_threshold: float = Field(0.0, ge=-1e6, le=1e6, description="v2: answer empty when null score - best score > this.")
    max_bad_answer_fraction: float = Field(
        0.01, ge=0, le=1, description="Examples whose answer_start misses the answer text are skipped up to "
        "this share of a split; above it the data is refused.")
    max_train_examples: int | None = Field(None, gt=0, le=MAX_COUNT, description="A seeded random subset of training examples.")
    max_validation_examples: int | None = Field(None, gt=0, le=MAX_COUNT)
    samples: list[QASample] = Field(default_factory=list, description="Answered after training; in metrics.json.")

    @model_validator(mode="after")
    def _stride_fits(self) -> QAConfig:
        if self.stride >= self.max_length // 2:
            raise ValueError(f"stride {self.stride} must be below half of max_length {self.max_length}")
        return self


class ClassifyConfig(Section):
    """Sequence classification (task classify): text (or a text pair) -> label(s) or a number."""

    text_pair_field: str | None = Field(None, description="A second text field (premise/hypothesis, question/answer).")
    label_field: str = "label"
    labels: list[str] | None = Field(
        None, description="Label names in id order; integer labels index this list. Default: from the training data.")
    problem_type: Literal["single_label", "multi_label", "regression"] = "single_label"
    max_length: int | None = Field(None, ge=8, le=MAX_TOKENS, description="Truncate to this many tokens (default: the model's).")
    truncation_side: Literal["right", "left"] = "right"
    max_train_examples: int | None = Field(None, gt=0, le=MAX_COUNT, description="A seeded random subset of training examples.")
    max_validation_examples: int | None = Field(None, gt=0, le=MAX_COUNT)
    balanced: bool = Field(False, description="Subsets take the same number of examples from every label.")
    samples: list[str] = Field(default_factory=list, description="Classified before and after; in metrics.json.")


class SFTConfig(Section):
    """Instruction tuning (task sft): records rendered as prompt + response, loss on the response."""

    format: Literal["template", "alpaca", "chat", "transcript"] = Field(
        "template", description="template: `template` with named fields; alpaca: instruction/input/output; "
        "chat: a conversation rendered by the tokenizer's chat template -- the record's `messages_field` (a list "
        "of {role, content}), or one user turn from `user_template` answered by `response_field`; transcript: "
        "one dialogue text whose last `response_marker` starts the response (HH-RLHF's chosen replies).")
    template: str = Field(
        "Please answer the following question.\nQ: {question}\nA: {answer}",
        description="Python format string over the record's fields; the response field comes last.")
    response_field: str = Field("answer", description="The field the model learns to write (template format).")
    messages_field: str = Field("messages", description="chat format: the record's list of messages.")
    user_template: str | None = Field(
        None, description="chat format, records without messages: the user's turn, a format string over the "
        "record's fields ('{question}'); the assistant's reply is `response_field`.")
    system_prompt: str | None = Field(
        None, description="chat format: a system message put first in conversations that have none.")
    assistant_turns: Literal["all", "last"] = Field(
        "all", description="chat format: learn every assistant turn of a conversation, or only the last.")
    field_values: dict[str, dict[str | int, str]] = Field(
        default_factory=dict, description="Values of a field written as words in templates, e.g. {label: "
        "{'0': negative, '1': positive}}.")
    max_field_chars: int | None = Field(
        None, ge=1, le=10**9, description="Prompt fields longer than this many characters keep their start, cut at a "
        "word boundary and marked with '…' (long reviews, articles); the response is never cut.")
    answer_pattern: str | None = Field(
        None, description="A regular expression whose first group is an example's final answer ('#### (.+)' for "
        "GSM8K): held-out prompts are answered (greedy) and the answers compared with the references.")
    answer_examples: int = Field(100, ge=1, le=MAX_COUNT, description="Held-out examples answered for answer_pattern.")
    answer_max_new_tokens: int = Field(256, ge=1, le=MAX_TOKENS, description="Tokens generated per answer for answer_pattern.")
    transcript_field: str = Field("chosen", description="transcript format: the record's dialogue text.")
    response_marker: str = Field("\n\nAssistant:", min_length=1,
                                 description="transcript format: the response follows this marker's last occurrence.")
    completion_only_loss: bool = Field(True, description="Loss on the response tokens only (prompt labels -100).")
    add_eos: bool = Field(True, description="End each response with EOS, so the tuned model learns to stop.")
    max_length: int = Field(512, ge=8, le=MAX_TOKENS, description="Longer examples are cut (from the end) to this many tokens.")
    packing: bool = Field(False, description="Concatenate examples into max_length sequences (fewer pad tokens).")
    max_train_examples: int | None = Field(None, gt=0, le=MAX_COUNT)
    max_validation_examples: int | None = Field(None, gt=0, le=MAX_COUNT)
    samples: list[dict[str, str]] = Field(
        default_factory=list, description="Records without the response, answered before and after training.")

    @model_validator(mode="after")
    def _answer_pattern_compiles(self) -> SFTConfig:
        if self.answer_pattern is not None:
            try:
                groups = re.compile(self.answer_pattern).groups
            except re.error as exc:
                raise ValueError(f"answer_pattern is not a valid regular expression ({exc})") from None
            if groups < 1:
                raise ValueError("answer_pattern needs a group around the answer, e.g. '#### (.+)'")
        return self


class PreferenceConfig(Section):
    """Pairwise preferences (tasks reward and dpo) and the prompts of task rl."""

    format: Literal["auto", "text", "chat"] = Field(
        "auto", description="text: prompts and replies as written; chat: through the tokenizer's chat template -- "
        "conversational records (TRL's: messages in prompt/chosen/rejected), dialogues written as text (read into "
        "turns by transcript_roles), or a text prompt as the user's turn; auto: chat for conversational records or "
        "a policy that is an lmtune chat SFT run, else text.")
    transcript_roles: dict[str, str] = Field(
        default_factory=lambda: {"\n\nHuman:": "user", "\n\nAssistant:": "assistant"},
        description="chat format: the markers that open each turn of a dialogue written as text, and their roles.")
    system_prompt: str | None = Field(None, description="chat format: a system message put first.")
    prompt_field: str = Field("prompt", description="Explicit prompts; without the field the prompt is the text "
                              "chosen and rejected share (HH-RLHF's whole dialogues).")
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    prompt_template: str | None = Field(
        None, description="Python format string over the record's fields that renders the prompt; default "
        "'{prompt}', or the prompt part of the SFT template when the policy is an lmtune SFT run.")
    max_length: int = Field(512, ge=8, le=MAX_TOKENS, description="Tokens per prompt + reply; longer texts lose their start.")
    max_prompt_length: int = Field(256, ge=1, le=MAX_TOKENS, description="dpo and rl: prompts keep their last this many tokens.")
    beta: float = Field(0.1, gt=0, le=1000, description="dpo: strength of the pull towards the reference model.")
    max_train_examples: int | None = Field(None, gt=0, le=MAX_COUNT)
    max_validation_examples: int | None = Field(None, gt=0, le=MAX_COUNT)
    samples: list[dict[str, str]] = Field(
        default_factory=list, description="reward: pairs scored before and after; dpo/rl: prompt records answered.")


class RLConfig(Section):
    """Online policy optimisation against a reward model (task rl), TRL's RLOO or GRPO."""

    reward_model: str | None = Field(None, description="A reward run dir (task reward) or a model folder.")
    algorithm: Literal["rloo", "grpo"] = Field(
        "rloo", description="rloo: REINFORCE with a leave-one-out baseline; grpo: group-normalised advantages with "
        "PPO's clipped ratio. Neither needs PPO's value model.")
    num_generations: int = Field(4, ge=2, le=1024, description="Completions sampled per prompt (the baseline's group).")
    max_completion_length: int = Field(32, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, gt=0, le=100)
    beta: float = Field(0.05, ge=0, le=1000, description="KL penalty towards the starting policy (0: no reference model).")
    eval_generations: int = Field(2, ge=1, le=1024, description="Completions sampled per held-out prompt for mean reward.")


class LoRAConfig(Section):
    """Low-rank adapters (peft) for training.mode lora."""

    r: int = Field(8, ge=1, le=65536)
    alpha: float = Field(16, gt=0, le=1e6)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; default per architecture (q_lin for DistilBERT, query/value for "
        "BERT and RoBERTa, c_attn for GPT-2).")
    modules_to_save: list[str] | None = Field(
        None, description="Trained in full beside the adapters; default: the task's new head.")


class TrainingConfig(Section):
    mode: Literal["full", "head", "lora"] = Field(
        "full", description="full: every weight; head: base frozen, the new task head trained; lora: adapters (peft).")
    learning_rate: float = Field(5e-4, gt=0, le=100)
    weight_decay: float = Field(0.0, ge=0, le=100)
    warmup_steps: float = Field(0, ge=0, le=MAX_STEPS, description="Steps, or a fraction of all steps when below 1.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="Per-device training batch size.")
    eval_batch_size: int | None = Field(None, ge=1, le=MAX_BATCH)
    gradient_accumulation_steps: int = Field(1, ge=1, le=MAX_BATCH)
    num_epochs: float = Field(1.0, gt=0, le=1e6)
    max_steps: int = Field(-1, ge=-1, le=MAX_STEPS, description="Overrides num_epochs when positive.")
    eval_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    logging_steps: int = Field(10, ge=1, le=MAX_STEPS)
    save_strategy: Literal["no", "steps", "epoch"] = "steps"
    save_steps: int = Field(500, ge=1, le=MAX_STEPS)
    save_total_limit: int | None = Field(2, ge=1, le=MAX_COUNT)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the hardware runs it natively, else fp32."
    )
    seed: int = Field(42, ge=0, le=MAX_SEED)
    max_grad_norm: float = Field(1.0, ge=0, le=1e6)
    dataloader_num_workers: int = Field(0, ge=0, le=256)
    group_by_length: bool = Field(False, description="Batch examples of similar length (less padding; QA, classify).")
    activation_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (gradient checkpointing): far less memory, more compute.")
    load_best_model_at_end: bool = Field(False, description="Keep the checkpoint with the best evaluation metric.")
    metric_for_best_model: str = Field("loss", description="An evaluation metric: loss, or the task's (accuracy, f1).")
    report_to: Literal["auto", "none", "tensorboard"] = Field(
        "auto", description="TensorBoard event files in the run dir's tensorboard/: auto when the package is installed.")
    fused_loss: bool = Field(
        True, description="The training loss computed where it is needed: causal LMs from the last hidden states "
        "in chunks, never holding the full-vocabulary logits; masked LMs with their output layer on the masked "
        "positions only. Same result, faster, less memory; false: the model's own loss.")
    estimate_steps: int = Field(
        3, ge=0, le=1000, description="Timed forward/backward passes before training for the time and memory estimate (0: none).")

    @model_validator(mode="after")
    def _eval_steps(self) -> TrainingConfig:
        if self.eval_strategy == "steps" and self.eval_steps is None:
            raise ValueError("eval_strategy 'steps' needs eval_steps")
        if self.load_best_model_at_end and (self.eval_strategy == "no" or self.save_strategy != self.eval_strategy):
            raise ValueError("load_best_model_at_end needs eval_strategy and save_strategy both 'epoch' or both 'steps'")
        return self


class GenerationConfig(Section):
    prompts: list[str] = Field(default_factory=list, description="Completed after training; saved in metrics.json.")
    max_new_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0, le=100)
    top_k: int = Field(50, ge=0, le=MAX_VOCAB)
    top_p: float = Field(1.0, gt=0, le=1)
    num_return_sequences: int = Field(1, ge=1, le=1024)
    repetition_penalty: float = Field(1.0, gt=0, le=100, description="Above 1 discourages repeating tokens.")
    no_repeat_ngram_size: int = Field(0, ge=0, le=1024, description="Forbid repeating n-grams of this size (0: off).")


class OutputConfig(Section):
    dir: str = Field("runs", description="Parent folder of run dirs.")


class RecipeConfig(Section):
    task: Literal["clm", "mlm", "qa", "classify", "sft", "reward", "dpo", "rl"] = "clm"
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    model: ModelConfig
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    mlm: MLMConfig = Field(default_factory=MLMConfig)
    qa: QAConfig = Field(default_factory=QAConfig)
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> RecipeConfig:
        if self.tokenizer.train and self.model.name_or_path is not None:
            raise ValueError("tokenizer.train needs model.from_scratch: a pretrained model keeps its own tokenizer")
        if self.model.from_scratch is not None and not self.tokenizer.train and self.model.tokenizer is None:
            raise ValueError("a model from scratch needs a tokenizer: set tokenizer.train: true or model.tokenizer")
        fs = self.model.from_scratch
        if self.task in ("reward", "dpo", "rl") and fs is not None:
            raise ValueError(f"task {self.task} tunes a pretrained model (an SFT run, for instance); set "
                             "model.name_or_path")
        allowed = CAUSAL_ARCHITECTURES if self.task in ("clm", "sft", "dpo", "rl") else MASKED_ARCHITECTURES
        if fs is not None and fs.architecture not in allowed:
            raise ValueError(
                f"task {self.task} needs model.from_scratch.architecture in {', '.join(allowed)}, not {fs.architecture}"
            )
        if self.task == "rl" and self.rl.reward_model is None:
            raise ValueError("task rl needs rl.reward_model: a reward run dir or a reward model folder")
        if self.task == "rl" and (self.training.batch_size * self.training.gradient_accumulation_steps
                                  ) % self.rl.num_generations:
            raise ValueError(f"task rl: training.batch_size x gradient_accumulation_steps must be a multiple of "
                             f"rl.num_generations ({self.rl.num_generations}), whole groups of completions per step")
        if self.training.mode == "head" and self.task in ("clm", "mlm", "sft", "dpo", "rl"):
            raise ValueError(f"training.mode head trains a new task head; task {self.task} keeps the pretrained LM head "
                             "(use full or lora)")
        if self.training.mode != "full" and self.model.from_scratch is not None:
            raise ValueError(f"training.mode {self.training.mode} adapts a pretrained model; a model from scratch "
                             "trains in full")
        if self.task != "clm" and (self.data.train.streaming or (self.data.validation and
                                                                 self.data.validation.streaming)):
            raise ValueError(f"streaming reads a causal-LM corpus as a stream; task {self.task} reads its examples "
                             "whole -- drop data.train.streaming")
        if self.task != "clm" and self.loss.type == "keytoken":
            raise ValueError("loss.type keytoken is a causal-LM loss; use it with task clm")
        if fs is not None and fs.n_positions is not None and fs.n_positions < self.data.block_size:
            raise ValueError(
                f"data.block_size {self.data.block_size} exceeds model.from_scratch.n_positions {fs.n_positions}"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------------------------
# Loading and error reporting


# PyYAML's C parser where it was built with libyaml (several times faster on big files); the resolver and
# constructor stay Python, so the customisations below apply to both.
_LoaderBase = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

MAX_RECIPE_BYTES = 1_000_000  # a recipe is a page of YAML; a larger file is data given in its place
MAX_RECIPE_NODES = 100_000  # values once aliases are expanded (YAML "billion laughs" stays tiny on disk)
DATA_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet", ".txt", ".gz", ".py", ".md", ".arrow", ".safetensors",
                 ".bin", ".gguf", ".npy")


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first: int, second: int):
        super().__init__(f"key '{_short(key)}' is written twice (lines {first} and {second})")
        self.first, self.second = first, second


class _RecipeLoader(_LoaderBase):
    """YAML 1.2 booleans: only true/false. YAML 1.1 also reads no/yes/on/off as booleans, which turns
    `save_strategy: no` into False. A key written twice in one mapping is refused, not silently replaced."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if key is None:
                    continue
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise DuplicateKey(key, seen[key], line)
                seen[key] = line
        return super().construct_mapping(node, deep)


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def expanded_size(node, memo: dict | None = None, limit: int = MAX_RECIPE_NODES) -> int:
    """How many values the document holds once every alias is expanded, counted on the composed graph
    (aliases are shared nodes, so this stays cheap however large the expansion would be)."""
    memo = {} if memo is None else memo
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = limit + 1  # a node that contains itself expands without end
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(expanded_size(k, memo, limit) + expanded_size(v, memo, limit) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(expanded_size(v, memo, limit) for v in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, limit + 1)
    return memo[id(node)]


def load_yaml(text: str):
    """The YAML document in `text` (a recipe, or a run's config.yaml), refused when its aliases expand
    past MAX_RECIPE_NODES values."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if expanded_size(node) > MAX_RECIPE_NODES:
            raise yaml.YAMLError(f"it expands to more than {MAX_RECIPE_NODES:,} values through its aliases (& and *)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _short(value, width: int = 60) -> str:
    """A value for an error message: on one line, at most `width` characters."""
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split()) if text.strip() else repr(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def parse_override(text: str) -> tuple[list[str], Any]:
    """'training.learning_rate=1e-4' -> (['training', 'learning_rate'], 0.0001); values are YAML."""
    if "=" not in text:
        raise InputError(f"--set '{text}' is not of the form key=value (e.g. --set training.max_steps=100).")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise InputError(f"--set '{text}' has an empty key; write e.g. --set training.max_steps=100.")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return raw


def _model_at(loc: tuple, root: type[BaseModel] = RecipeConfig) -> type[BaseModel] | None:
    """The schema class that owns the field at `loc` (for suggesting a valid key)."""
    import typing

    current: Any = root
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        current = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)),
            None,
        )
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _printable(part: Any) -> str:
    text = str(part)
    return text if text.isprintable() else repr(text)[1:-1]  # a key such as "\n" shown escaped, on one line


def _without_union_tags(loc: tuple) -> tuple:
    return tuple(p for p in loc if not (isinstance(p, str) and p in {"str", "list[str]"}))


PLAIN_MESSAGES = [(r"^Input should be a valid dictionary$", "must be a mapping of settings (key: value)"),
                  (r"^Input should be less than or equal to ", "must be at most "),
                  (r"^Input should be greater than or equal to ", "must be at least "),
                  (r"^Input should be less than ", "must be below "),
                  (r"^Input should be greater than ", "must be above "),
                  (r"^Input should be ", "must be ")]


def _describe(error: dict) -> str:
    if error["type"] == "extra_forbidden":  # the unknown key is the last part, whatever it is called
        loc = _without_union_tags(error["loc"][:-1]) + error["loc"][-1:]
    else:
        loc = _without_union_tags(error["loc"])
    where = ".".join(_printable(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        owner = _model_at(loc)
        valid = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{'.'.join(str(p) for p in loc[:-1] + (close[0],))}'?" if close else (
            f"valid keys here: {', '.join(valid)}" if valid else "remove it"
        )
        return f"unknown key '{where}' ({hint})"
    if error["type"] == "missing":
        return f"'{where}' is required"
    msg = " ".join(error["msg"].removeprefix("Value error, ").split())
    msg = re.sub(r" or instance of \w+", "", msg)  # pydantic's class names mean nothing to a recipe's author
    for pydantic_words, plain in PLAIN_MESSAGES:
        msg = re.sub(pydantic_words, plain, msg)
    if error["type"] == "string_pattern_mismatch":
        msg = "must start with a letter or digit and hold only letters, digits, '.', '_' and '-'"
    elif error["type"] in ("finite_number",):
        msg = "must be a finite number (not inf or nan)"
    got = error.get("input")
    shown = f" (got {_short(repr(got))})" if not isinstance(got, dict) else ""
    return f"'{where}': {msg}{shown}" if loc else msg


def validate_recipe(raw: Any, origin: str = "recipe") -> RecipeConfig:
    if not isinstance(raw, dict):
        raise InputError(f"{origin} must be a YAML mapping of sections (task, model, data, ...), not {type(raw).__name__}.")
    try:
        return RecipeConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        # Deduplicate while keeping order: unions can report one problem per branch.
        problems = list(dict.fromkeys(problems))
        more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise InputError(f"{origin} is invalid: " + "; ".join(problems[:8]) + more + ".") from None


def read_recipe_yaml(path: str | Path):
    """The YAML of a recipe file, or one sentence: missing, not a regular file, too big, a data file, not
    YAML (at the line where the construct that broke started), a key written twice, alias bombs."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"recipe '{path}' does not exist; give the path of a YAML recipe (see recipes/).")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise InputError(f"recipe '{path}' is {kind}; give the path of a YAML recipe file (see recipes/).")
    size = path.stat().st_size
    if path.suffix.lower() in DATA_SUFFIXES or size > MAX_RECIPE_BYTES:
        what = f"a {path.suffix.lower()} file" if path.suffix.lower() in DATA_SUFFIXES else f"{size / 1e6:.1f} MB"
        raise InputError(f"recipe '{path}' is {what}, not a YAML recipe (a page of settings); give the recipe and "
                         "name data files in it under data.train.path.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"recipe '{path}' is not UTF-8 text, so not a YAML recipe; give the recipe (see "
                         "recipes/).") from None
    except OSError as exc:
        raise InputError(f"recipe '{path}' cannot be read ({exc.strerror}); check its permissions.") from None
    if "\x00" in text:
        raise InputError(f"recipe '{path}' holds binary data, not a YAML recipe; give the recipe (see recipes/).")
    try:
        raw = load_yaml(text)
    except DuplicateKey as exc:
        raise InputError(f"recipe '{path}': {exc}; keep one of them.") from None
    except yaml.MarkedYAMLError as exc:
        # Where the broken construct started (a quote never closed, a key without its colon): the parser
        # itself often notices only on the line after.
        mark = exc.context_mark or exc.problem_mark
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = f" ({_short(exc.problem, 80)})" if exc.problem else ""
        raise InputError(f"recipe '{path}' is not valid YAML{line}{problem}; fix the syntax there.") from None
    except yaml.YAMLError as exc:
        raise InputError(f"recipe '{path}' is refused: {_short(str(exc), 120)}.") from None
    except RecursionError:
        raise InputError(f"recipe '{path}' is nested too deeply to be a recipe; give the recipe (see "
                         "recipes/).") from None
    if raw is None:
        raise InputError(f"recipe '{path}' is empty; see recipes/ for examples.")
    if not isinstance(raw, dict) or not ({"task", "name", "model", "data", "steps"} & set(map(str, raw))):
        raise InputError(f"recipe '{path}' is not a recipe: it has none of the sections task, name, model, data "
                         "(or steps, for a chain); see recipes/ for examples.")
    return raw


def is_chain(raw: Any) -> bool:
    return isinstance(raw, dict) and "steps" in raw


# Sections that only one family of tasks reads: written in a recipe of another task, they would be ignored.
TASK_SECTIONS = {"mlm": {"mlm"}, "qa": {"qa"}, "classify": {"classify"}, "sft": {"sft"},
                 "preference": {"reward", "dpo", "rl"}, "rl": {"rl"}, "loss": {"clm"}}


def check_sections_apply(raw: dict, origin: str) -> None:
    """A recipe's own sections (not the defaults a saved config.yaml spells out) must be read by its task."""
    task = raw.get("task", "clm")
    if not isinstance(task, str):
        return  # the schema reports it
    ignored = [name for name, tasks in TASK_SECTIONS.items() if name in raw and task not in tasks]
    if ignored:
        raise InputError(f"{origin}: task {task} does not read the section{'s' if len(ignored) > 1 else ''} "
                         f"{', '.join(ignored)}; remove {'them' if len(ignored) > 1 else 'it'} (or change task).")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    raw = read_recipe_yaml(path)
    if is_chain(raw):
        raise InputError(f"recipe '{path}' is a chain of steps; run it with lmtune train (not this command).")
    if isinstance(raw, dict) and overrides:
        raw = apply_overrides(raw, overrides)
    config = validate_recipe(raw, origin=f"recipe '{path}'")
    check_sections_apply(raw, f"recipe '{path}'")
    return config


# --------------------------------------------------------------------------------------------------
# Chains: recipes run one after another, a step naming an earlier step's run dir as ${name}


class ChainStep(BaseModel):
    name: str
    config: RecipeConfig
    run_dir: Path


_STEP_REFERENCE = re.compile(r"\$\{([A-Za-z0-9._-]+)\}")


def _substitute(node: Any, run_dirs: dict[str, Path], step: str, origin: str) -> Any:
    if isinstance(node, dict):
        return {k: _substitute(v, run_dirs, step, origin) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, run_dirs, step, origin) for v in node]
    if not isinstance(node, str):
        return node

    def run_dir_of(match) -> str:
        name = match.group(1)
        if name not in run_dirs:
            raise InputError(f"{origin}: step '{step}' names ${{{name}}}, which is not an earlier step; "
                             f"earlier steps: {', '.join(run_dirs) or '(none)'}.")
        return str(run_dirs[name])

    return _STEP_REFERENCE.sub(run_dir_of, node)


def load_chain(path: str | Path, overrides: list[str] | None = None, output: str | Path | None = None
               ) -> list[ChainStep]:
    """A chain recipe: `name`, `output.dir` (default runs/<name>) and `steps`, each a whole recipe whose
    strings may name an earlier step's run dir as ${step_name}. Overrides are `step.key=value`. Every
    step is validated before the first one runs."""
    raw = read_recipe_yaml(path)
    origin = f"recipe '{path}'"
    if not is_chain(raw) or not isinstance(raw["steps"], list) or not raw["steps"]:
        raise InputError(f"{origin}: a chain needs 'steps', a list of recipes.")
    unknown = set(raw) - {"name", "description", "output", "steps"}
    if unknown:
        raise InputError(f"{origin}: unknown chain keys {', '.join(sorted(unknown))}; a chain has name, "
                         "description, output and steps.")
    name = str(raw.get("name") or Path(path).stem)
    parent = Path(output) if output else Path((raw.get("output") or {}).get("dir") or Path("runs") / name)
    steps_raw = raw["steps"]
    names = [s.get("name") if isinstance(s, dict) else None for s in steps_raw]
    if None in names or len(set(names)) != len(names):
        raise InputError(f"{origin}: every step needs a name of its own; got {names}.")
    by_step: dict[str, list[str]] = {n: [] for n in names}
    for text in overrides or []:
        step, _, rest = text.partition(".")
        if step not in by_step or not rest:
            raise InputError(f"--set '{text}': a chain's overrides start with a step name ({', '.join(names)}), "
                             "e.g. --set sft.training.max_steps=10.")
        by_step[step].append(rest)
    run_dirs: dict[str, Path] = {}
    steps = []
    for step_name, step_raw in zip(names, steps_raw):
        step_raw = apply_overrides(_substitute(step_raw, run_dirs, step_name, origin), by_step[step_name])
        config = validate_recipe(step_raw, origin=f"{origin}, step '{step_name}'")
        check_sections_apply(step_raw, f"{origin}, step '{step_name}'")
        run_dirs[step_name] = parent / step_name
        steps.append(ChainStep(name=step_name, config=config, run_dir=parent / step_name))
    return steps
