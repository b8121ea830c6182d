"""Calls the gateway with the stock tritonclient[grpc] client and prints what came back as JSON.

Run as its own process (tritonclient's generated protos clash with ours in one process):
    python tritonclient_probe.py HOST:PORT              tests/test_gateway_api.py
    python tritonclient_probe.py HOST:PORT --key KEY    tests/test_security.py: API keys in headers=
"""

import json
import sys

import numpy as np
import tritonclient.grpc as tc

PROMPTS = ["Hello there", "A longer prompt about experts and routers.", "Hi"]


def main(address: str) -> None:
    client = tc.InferenceServerClient(address)
    out = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("switch"),
        "metadata_inputs": [i.name for i in client.get_model_metadata("switch").inputs],
        "prompts": PROMPTS,
    }
    text = tc.InferInput("text_input", [len(PROMPTS)], "BYTES")
    text.set_data_from_numpy(np.array([p.encode() for p in PROMPTS], dtype=object))
    max_tokens = tc.InferInput("max_tokens", [1], "INT32")
    max_tokens.set_data_from_numpy(np.array([6], dtype=np.int32))
    result = client.infer("switch", [text, max_tokens])
    out["text_output"] = [t.decode() for t in result.as_numpy("text_output")]
    out["output_ids"] = result.as_numpy("output_ids").tolist()

    # input_ids INT64 [B, S], right-padded with the pad token (0), per-row max_tokens.
    rows = [[5, 17, 99, 1], [42, 1], [7, 8, 9, 10, 11, 1]]
    width = max(map(len, rows))
    padded = np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64)
    ids = tc.InferInput("input_ids", list(padded.shape), "INT64")
    ids.set_data_from_numpy(padded)
    limits = [2, 4, 0]
    mt = tc.InferInput("max_tokens", [3], "INT32")
    mt.set_data_from_numpy(np.array(limits, dtype=np.int32))
    result = client.infer("switch", [ids, mt], outputs=[tc.InferRequestedOutput("output_ids")])
    out.update(id_prompts=rows, id_limits=limits, ids_output_ids=result.as_numpy("output_ids").tolist(),
               ids_text_output_absent=result.as_numpy("text_output") is None)
    try:
        client.infer("no-such-model", [text])
        out["unknown_model_status"] = "OK"
    except tc.InferenceServerException as exc:
        out["unknown_model_status"] = str(exc.status())
    print(json.dumps(out))


def with_key(address: str, key: str) -> None:
    """A wrong key and the right one, in headers=, for a readiness check and an inference."""
    client = tc.InferenceServerClient(address)
    out = {}
    try:
        client.is_server_ready(headers={"authorization": "Bearer nope"})
        out["wrong_key_ready"] = "OK"
    except tc.InferenceServerException as exc:
        out["wrong_key_ready"] = str(exc.status())
    out["ready"] = client.is_server_ready(headers={"authorization": f"Bearer {key}"})
    text = tc.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"keys please"], dtype=object))
    try:
        client.infer("switch", [text])
        out["no_key_infer"] = "OK"
    except tc.InferenceServerException as exc:
        out["no_key_infer"] = str(exc.status())
    result = client.infer("switch", [text], headers={"authorization": f"Bearer {key}"})
    out["text_output_shape"] = list(result.as_numpy("text_output").shape)
    print(json.dumps(out))


if __name__ == "__main__":
    if "--key" in sys.argv:
        with_key(sys.argv[1], sys.argv[sys.argv.index("--key") + 1])
    else:
        main(sys.argv[1])
