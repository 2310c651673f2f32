"""Writing a Llama-family model as a GGUF file with the `gguf` package's writer: the architecture's
metadata, the byte-level BPE tokenizer (vocabulary, token types, merges, special ids), the chat
template, and the tensors under llama.cpp's names (from the package's own name map).

llama.cpp stores the query and key projections with the two halves of each head's rotary dimensions
interleaved; transformers undoes that on reading, so it is done here on writing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmtune.errors import InputError

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def interleave_rotary_halves(weight: np.ndarray, heads: int) -> np.ndarray:
    """transformers' [half 1 | half 2] rotary layout per head -> llama.cpp's pairwise layout."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def byte_level_vocabulary(tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their GGUF types, merges) of a byte-level BPE tokenizer."""
    import json

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise InputError(f"writing GGUF needs a byte-level BPE tokenizer; this one is {model.get('type')}.")
    added = {t["id"]: t for t in state.get("added_tokens", [])}
    size = max([*model["vocab"].values(), *added]) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [USER_DEFINED] * size
    for token, i in model["vocab"].items():
        tokens[i], types[i] = token, NORMAL
    for i, token in added.items():
        tokens[i], types[i] = token["content"], CONTROL if token.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def write_llama_gguf(model, tokenizer, path: str | Path, dtype: str = "f32") -> Path:
    """A LlamaForCausalLM (and its tokenizer) as one GGUF file, weights in f32 or f16."""
    import gguf
    import torch

    config = model.config
    if config.model_type != "llama":
        raise InputError(f"writing GGUF is implemented for Llama-family models; this one is {config.model_type}.")
    path = Path(path)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name(str(getattr(config, "name_or_path", "") or "lmtune model"))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)

    tokens, types, merges = byte_level_vocabulary(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id,
                          tokenizer.eos_token_id), (writer.add_pad_token_id, tokenizer.pad_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id)):
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads a missing output.weight as tied to the embeddings
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InputError(f"writing GGUF: no llama.cpp name for the tensor {hf_name}.")
        weight = tensor.detach().to(torch.float32).numpy()
        if name.endswith("attn_q.weight"):
            weight = interleave_rotary_halves(weight, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            weight = interleave_rotary_halves(weight, config.num_key_value_heads)
        # Norms and other vectors stay f32, as llama.cpp keeps them.
        if dtype == "f16" and weight.ndim > 1:
            writer.add_tensor(name, weight.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)
        else:
            writer.add_tensor(name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
