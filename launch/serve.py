"""OpenAI-compatible chat-completions server over the sampler.

  python launch/serve.py --checkpoint=ORBAX_DIR --tokenizer=tok.model [--port=8000]
  python launch/serve.py --hf_dir=HF_DIR                       # tokenizer.json from the directory
  python launch/serve.py --gguf=pretrained:smollm2-135m-instruct   # a GGUF file and its own tokenizer
  python launch/serve.py --preset=tiny --tokenizer=tok.model   # random weights (smoke tests)

Then e.g. `openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x").chat.completions.create(...)`.
Requests arriving within --batch_window_ms of each other are decoded together.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from launch.cli import parse_mesh_flag  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Orbax model checkpoint directory (model_checkpoint.save_model)")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face Glm4MoeForCausalLM directory")
_GGUF = flags.DEFINE_string("gguf", None, "a llama GGUF file or pretrained:NAME (its own tokenizer unless --tokenizer)")
_PRESET = flags.DEFINE_string("preset", None, "random init of a model preset (tiny, small, glm45_air)")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece .model, tokenizer.json or a .gguf model file")
_CHAT_TEMPLATE = flags.DEFINE_string("chat_template", "auto",
                                     "auto | glm45 | chatml (auto: from the tokenizer's special tokens)")
_MODEL_OVERRIDES = flags.DEFINE_string("model_overrides", "{}",
                                       'JSON ModelConfig fields, e.g. {"compute_dtype": "bfloat16"}')
_MESH = flags.DEFINE_string("mesh", "fsdp:-1", "mesh as axis:size,... over all devices")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "emulated CPU devices (0: leave as is)")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "address to listen on")
_PORT = flags.DEFINE_integer("port", 8000, "port to listen on")
_MODEL_NAME = flags.DEFINE_string("model_name", "klong-jax", "the model id the API reports")
_BATCH_WINDOW_MS = flags.DEFINE_float("batch_window_ms", 5.0, "how long a batch waits for more requests")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 32, "most sequences decoded together")
_MAX_TOKENS = flags.DEFINE_integer("default_max_tokens", 1024, "max_tokens when a request gives none")
_DECODE_CHUNK = flags.DEFINE_integer("decode_chunk", 32, "decode steps between host checks (stop strings)")
_SEED = flags.DEFINE_integer("seed", 0, "random init seed (--preset) and the sampler's seed source")


def main(_):
    from klong_jax.runtime import setup_devices
    setup_devices(_CPU_DEVICES.value)
    import uvicorn

    from klong_jax.data.chat_template import check_chat_template_name
    from klong_jax.sampling import Sampler
    from klong_jax.serving import ChatEngine, create_app
    from klong_jax.serving.loading import load_serving_model, resolve_tokenizer
    from klong_jax.sharding import make_mesh

    try:
        check_chat_template_name(_CHAT_TEMPLATE.value, "--chat_template")
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    try:
        overrides = json.loads(_MODEL_OVERRIDES.value)
    except json.JSONDecodeError as e:
        raise app.UsageError(f"--model_overrides is not JSON: {e}") from None
    mesh = make_mesh(parse_mesh_flag(_MESH.value))
    try:
        tokenizer = resolve_tokenizer(_TOKENIZER.value, _HF_DIR.value, _GGUF.value)
        model = load_serving_model(checkpoint=_CHECKPOINT.value, hf_dir=_HF_DIR.value, gguf=_GGUF.value,
                                   preset_name=_PRESET.value,
                                   mesh=mesh, seed=_SEED.value, **overrides)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise app.UsageError(f"the tokenizer has {tokenizer.vocab_size} ids, the model only {model.cfg.vocab_size}")
    sampler = Sampler(model, tokenizer, mesh=mesh, decode_chunk=_DECODE_CHUNK.value,
                      max_batch=_MAX_BATCH.value, seed=_SEED.value)
    try:
        engine = ChatEngine(sampler, model_name=_MODEL_NAME.value, batch_window_ms=_BATCH_WINDOW_MS.value,
                            max_batch=_MAX_BATCH.value, default_max_tokens=_MAX_TOKENS.value,
                            chat_template=_CHAT_TEMPLATE.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    print(f"serving {_MODEL_NAME.value} on http://{_HOST.value}:{_PORT.value}/v1", flush=True)
    try:
        uvicorn.run(create_app(engine), host=_HOST.value, port=_PORT.value, log_level="info")
    finally:
        engine.close()


if __name__ == "__main__":
    app.run(main)
