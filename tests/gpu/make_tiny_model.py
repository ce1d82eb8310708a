"""Build a tiny random-weight MiniMax-M2-architecture checkpoint + tokenizer (about 5 MB).

Run on the GPU machine with a Python that has torch, transformers==5.17.0, tokenizers,
safetensors (the H200 image has them). Usage: python3 tests/gpu/make_tiny_model.py OUT_DIR

MiniMaxM2ForCausalLM, 2 layers, 4 query / 2 KV heads, head_dim 64, 8 experts (2 active),
bf16: 1,024 B of KV cache per token at TP=1 and 512 B per GPU at TP=2. The tokenizer is a
byte-level BPE with MiniMax-M2's special tokens (<think>, </think>, <minimax:tool_call>,
</minimax:tool_call>, eos "[e~[") and a chat template that opens the assistant turn with
<think> (what the minimax_m2_append_think reasoning parser expects). The same builder
made the model of the 2026-11-28 H200 runs (docs/gpu-validation.md); its output without the
weights file is checked in as tests/fixtures/tiny-minimax-m2/.
"""
import json, os, sys
import torch
from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)

# ---------------- tokenizer ----------------
special = ["<unk>", "<pad>", "]~!b[", "[e~[", "]~b]", "<think>", "</think>",
           "<minimax:tool_call>", "</minimax:tool_call>"]
# eos "[e~[" and bos "]~!b[" / role marker "]~b]" mirror MiniMax-M2's special tokens
corpus = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How are you today? I am fine, thank you.",
    "What is the weather in Seattle? It is rainy and cold.",
    "system user assistant tool function call parameter name invoke",
    "<invoke name=\"get_weather\"> <parameter name=\"city\">Paris</parameter> </invoke>",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 { } [ ] ( ) : ; , . ' \" - _ / \\ = + * & % $ # @",
    "Say hi. Write a short poem about GPUs, memory, caches and tokens.",
] * 50
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=special,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                              show_progress=False)
tok.train_from_iterator(corpus, trainer)
vocab_n = tok.get_vocab_size()
chat_template = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}]~!b[]~b]system\n{{ message['content'] }}[e~[\n"
    "{%- elif message['role'] == 'user' -%}]~b]user\n{{ message['content'] }}[e~[\n"
    "{%- elif message['role'] == 'assistant' -%}]~b]ai\n{{ message['content'] }}[e~[\n"
    "{%- elif message['role'] == 'tool' -%}]~b]tool\n{{ message['content'] }}[e~[\n"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if tools -%}]~b]system\nTools: {{ tools | tojson }}[e~[\n{%- endif -%}"
    "{%- if add_generation_prompt -%}]~b]ai\n<think>\n{%- endif -%}"
)
hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                 bos_token="]~!b[", eos_token="[e~[",
                                 additional_special_tokens=special[4:])
hf_tok.chat_template = chat_template
hf_tok.save_pretrained(out)
ids = {t: hf_tok.convert_tokens_to_ids(t) for t in special}
print("vocab size:", vocab_n, "special ids:", ids)

# ---------------- model ----------------
VOCAB = 1024  # >= tokenizer vocab, multiple of 64
assert vocab_n <= VOCAB
cfg = MiniMaxM2Config(
    vocab_size=VOCAB, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    max_position_embeddings=8192, num_local_experts=8, num_experts_per_tok=2,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=ids["]~!b["], eos_token_id=ids["[e~["], pad_token_id=ids["<pad>"],
    rope_parameters={"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5},
)
cfg.dtype = torch.bfloat16
model = MiniMaxM2ForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(out, safe_serialization=True)

# Add the MiniMax-M2-specific keys that vLLM's minimax_m2.py reads (real config.json has them)
cp = os.path.join(out, "config.json")
c = json.load(open(cp))
c.update({
    "architectures": ["MiniMaxM2ForCausalLM"],
    "model_type": "minimax_m2",
    "rotary_dim": 32,                 # real: 64 with head_dim 128 -> same 0.5 ratio
    "rope_theta": 5000000.0,
    "scoring_func": "sigmoid",
    "use_routing_bias": True,
    "use_mtp": False,
    "qk_norm_type": "per_layer",
    "torch_dtype": "bfloat16",
})
json.dump(c, open(cp, "w"), indent=2)
print(json.dumps(c, indent=2))

# Also embed the chat template in tokenizer_config.json (transformers 5 writes chat_template.jinja)
tp = os.path.join(out, "tokenizer_config.json")
t = json.load(open(tp))
t["chat_template"] = chat_template
json.dump(t, open(tp, "w"), indent=2)
