"""Real weights through the loop: SmolLM2-135M-Instruct (ChatML) served, fine-tuned, registered.

Loaded once per session; the fine-tune takes a few steps only: these tests check that a real chat
model keeps stopping at the end of its turn everywhere, not how well it learns.
"""

import json

import pytest
import torch
from support import PHI3_TOKENIZER, Server, http


QUESTIONS = ["What is the capital of France?", "Write one sentence about the sea."]
NEW_TOKENS = 24


def plain_generate(model_dir, question: str, max_new_tokens: int = NEW_TOKENS) -> tuple[str, list[int]]:
    """What transformers alone makes of the saved folder: greedy, its own generation config."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = _load(str(model_dir))
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    return tok.decode(new, skip_special_tokens=True), new


_models = {}


def _load(path: str):
    from transformers import AutoModelForCausalLM

    if path not in _models:
        _models[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _models[path]


@pytest.fixture(scope="module")
def smollm2_finetuned(smollm2_model, test_root):
    from finetune_phi.data.prepare import prepare
    from finetune_phi.training.trainer import TrainConfig, train

    data = test_root / "data-small"
    prepare("sample", data, sample_size=40)  # 32 train / 8 test rows: the held-out loss is measured twice
    return train(
        TrainConfig(
            base_model="smollm2-135m",
            train_file=str(data / "train.jsonl"),
            eval_file=str(data / "test.jsonl"),
            out=str(test_root / "models" / "smollm2-ft"),
            lora=True,
            lr=3e-4,
            batch_size=4,
            max_length=128,
            registered_model="smollm2-ft",
            extra={"max_steps": 3, "eval_strategy": "no"},
        )
    )


@pytest.fixture(scope="module")
def real_endpoint(smollm2_model, smollm2_finetuned, tiny_model, test_root):
    """One endpoint for the module: the real model, its short fine-tune (ft) and the tiny model."""
    server = Server(
        [
            "--deployment",
            f"smollm2={smollm2_model}",
            "--deployment",
            f"ft={smollm2_finetuned.out}",
            "--deployment",
            f"tiny={tiny_model}",
        ],
        test_root / "serve-real.log",
        env={"FINETUNE_PHI_API_KEY": "real-model-test-key"},
    )
    yield server
    server.stop()


@pytest.mark.parametrize("deployment", ["smollm2", "tiny"])
@pytest.mark.slow
def test_greedy_endpoint_text_equals_model_generate(real_endpoint, smollm2_model, tiny_model, deployment):
    model_dir = smollm2_model if deployment == "smollm2" else tiny_model
    for question in QUESTIONS:
        expected, tokens = plain_generate(model_dir, question)
        messages = [{"role": "user", "content": question}]
        status, _, score = http(
            "POST",
            real_endpoint.url + "/score",
            {"input_data": {"input_string": messages, "parameters": {"temperature": 0, "max_new_tokens": NEW_TOKENS}}},
            real_endpoint.auth(**{"azureml-model-deployment": deployment}),
        )
        assert status == 200 and score["output"] == expected.strip()
        status, _, v1 = http(
            "POST",
            real_endpoint.url + "/v1/chat/completions",
            {"model": deployment, "messages": messages, "temperature": 0, "max_tokens": NEW_TOKENS},
            real_endpoint.auth(),
        )
        assert status == 200 and v1["choices"][0]["message"]["content"] == expected.strip()  # OpenAI's API strips
        # generate() counts the stop token it ended on; the endpoint does not send it
        stopped = len(tokens) < NEW_TOKENS or tokens[-1] in _load(str(model_dir)).generation_config.eos_token_id
        assert v1["usage"]["completion_tokens"] == len(tokens) - (1 if stopped else 0)


@pytest.mark.slow
def test_real_model_answers_the_question(real_endpoint):
    status, _, body = http(
        "POST",
        real_endpoint.url + "/v1/chat/completions",
        {
            "model": "smollm2",
            "messages": [{"role": "user", "content": QUESTIONS[0]}],
            "temperature": 0,
            "max_tokens": 32,
        },
        real_endpoint.auth(),
    )
    assert status == 200 and "Paris" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.slow
def test_fine_tuned_real_model_stops_at_end_of_turn_everywhere(smollm2_finetuned, smollm2_model, real_endpoint):
    """The bug the toy hid: a fine-tuned ChatML model saved with eos_token_id [] never stopped."""
    out = smollm2_finetuned.out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    saved = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert im_end in (saved if isinstance(saved, list) else [saved])
    assert tok.chat_template == AutoTokenizer.from_pretrained(smollm2_model).chat_template  # the stock template

    # 1. plain transformers
    text, tokens = plain_generate(out, QUESTIONS[0], max_new_tokens=64)
    assert tokens[-1] == im_end and len(tokens) < 64 and "user" not in text

    # 2. the registered MLflow model, as a pyfunc (what an MLflow or Azure ML deployment runs)
    import mlflow

    pyfunc = mlflow.pyfunc.load_model(f"models:/smollm2-ft/{smollm2_finetuned.registered_version}")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": QUESTIONS[0]}], tokenize=False, add_generation_prompt=True
    )
    (answer,) = pyfunc.predict([prompt], params={"max_new_tokens": 64, "do_sample": False, "return_full_text": False})
    assert answer.strip() == text.strip()

    # 3. our endpoint
    status, _, body = http(
        "POST",
        real_endpoint.url + "/v1/chat/completions",
        {"model": "ft", "messages": [{"role": "user", "content": QUESTIONS[0]}], "temperature": 0, "max_tokens": 64},
        real_endpoint.auth(),
    )
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == text.strip()


def _assistant_text(tok, row) -> str:
    return tok.decode([i for i, m in zip(row["input_ids"], row["assistant_masks"], strict=True) if m])


CONVERSATION = [
    {"role": "user", "content": "Hi, I am Ann."},
    {"role": "assistant", "content": "Hello Ann!"},
    {"role": "user", "content": "Capital of Peru?"},
    {"role": "assistant", "content": "Lima."},
]


@pytest.mark.slow
def test_assistant_mask_derived_from_chatml_covers_exactly_the_replies(smollm2_model):
    from transformers import AutoTokenizer

    from finetune_phi.modeling.models import end_of_turn_token
    from finetune_phi.training.assistant_mask import (
        tokenize_with_mask,
        trl_training_template,
    )

    tok = AutoTokenizer.from_pretrained(smollm2_model)
    assert trl_training_template(tok) is None  # TRL has no ChatML training template: the mask is derived
    row = tokenize_with_mask(tok, CONVERSATION, end_of_turn_token(tok))
    assert _assistant_text(tok, row) == "Hello Ann!<|im_end|>Lima.<|im_end|>"
    assert row["input_ids"] == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]


@pytest.mark.skipif(not PHI3_TOKENIZER.exists(), reason="shared Phi-3 tokenizer not present")
def test_assistant_mask_for_phi3_from_trl_and_derived_agree():
    from transformers import AutoTokenizer

    from finetune_phi.modeling.models import end_of_turn_token
    from finetune_phi.training.assistant_mask import (
        tokenize_with_mask,
        trl_training_template,
    )

    tok = AutoTokenizer.from_pretrained(PHI3_TOKENIZER)
    derived = tokenize_with_mask(tok, CONVERSATION, end_of_turn_token(tok))
    assert _assistant_text(tok, derived) == "Hello Ann!<|end|>Lima.<|end|>"
    trl = tok.apply_chat_template(
        CONVERSATION,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        chat_template=trl_training_template(tok),
    )
    # TRL's Phi-3 training template also trains the closing <|endoftext|>; otherwise the same tokens
    assert _assistant_text(tok, trl) == "Hello Ann!<|end|>Lima.<|end|><|endoftext|>"


@pytest.mark.slow
def test_a_template_that_hides_turns_is_a_clear_error_naming_loss_on_all(smollm2_model):
    from transformers import AutoTokenizer

    from finetune_phi.training.assistant_mask import TemplateError, tokenize_with_mask

    tok = AutoTokenizer.from_pretrained(smollm2_model)
    # a template that only shows the last exchange: earlier prefixes are not prefixes of the whole
    tok.chat_template = (
        "{% for m in messages[-2:] %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(TemplateError, match="--loss-on all"):
        tokenize_with_mask(tok, CONVERSATION, "<|im_end|>")


@pytest.mark.slow
def test_azure_ai_evaluations_coherence_evaluator_runs_on_our_endpoint(real_endpoint):
    """azure-ai-evaluation's AI-assisted evaluators send response_format json_object (their prompty asks for
    {reason, score, status}; before, our endpoint refused it with 400): the answer is held to a JSON object.
    A protocol check only: SmolLM2-135M (the model under test) writes an object without a score, so the
    evaluator's score is NaN — a credible judge is a strong model (docs/evaluation.md: a judge)."""
    from azure.ai.evaluation import CoherenceEvaluator, OpenAIModelConfiguration

    config = OpenAIModelConfiguration(
        type="openai", base_url=real_endpoint.url + "/v1", api_key=real_endpoint.key, model="smollm2"
    )
    result = CoherenceEvaluator(config)(
        query="What is the capital of France?", response="The capital of France is Paris."
    )
    reply = json.loads(result["coherence_properties"]["sample_output"])[-1]["content"]
    assert isinstance(json.loads(reply), dict), reply  # a JSON object, as OpenAI's json_object promises
    assert result["coherence_properties"]["finish_reason"] == "stop"  # it closed the object: not cut at max_tokens


@pytest.mark.parametrize(
    "response_format, check",
    [
        ({"type": "json_object"}, lambda value: isinstance(value, dict)),
        (
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "rating",
                    "schema": {
                        "type": "object",
                        "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5}},
                        "required": ["score"],
                        "additionalProperties": False,
                    },
                },
            },
            lambda value: set(value) == {"score"} and 1 <= value["score"] <= 5,
        ),
    ],
)
@pytest.mark.slow
def test_response_format_holds_the_answer_to_json_and_other_engines_refuse_it(real_endpoint, response_format, check):
    body = {
        "model": "smollm2",
        "temperature": 0,
        "max_tokens": 48,
        "response_format": response_format,
        "messages": [{"role": "user", "content": "Rate 'The cat sat on the mat.' from 1 to 5 as JSON."}],
    }
    status, _, answer = http("POST", real_endpoint.url + "/v1/chat/completions", body, real_endpoint.auth())
    assert status == 200, answer
    assert check(json.loads(answer["choices"][0]["message"]["content"]))
    bad = dict(body, response_format={"type": "xml"})
    status, _, answer = http("POST", real_endpoint.url + "/v1/chat/completions", bad, real_endpoint.auth())
    assert status == 400 and "response_format" in answer["error"]["message"]


def test_an_engine_that_cannot_constrain_refuses_response_format():
    from finetune_phi.serving.engines.base import Engine
    from finetune_phi.serving.generation import GenerationParams, ParamError

    class Plain(Engine):
        name = "plain"

        def submit(self, row):
            raise AssertionError("never reached")

    params = GenerationParams.parse({"response_format": {"type": "json_object"}})
    with pytest.raises(ParamError, match="the plain engine cannot constrain"):
        Plain(None, 100, []).encode("hi", params)
