"""What tests send to the API: the API key every test server is configured with, and item payloads."""

from __future__ import annotations

from service.images import encode_png_base64
from trainer.data import Dataset

API_KEY = "test-key"
H = {"X-API-Key": API_KEY}  # the header of mutating requests


def item_payload(ds: Dataset, indices, prefix: str = "g") -> list[dict]:
    return [
        {
            "external_id": f"{prefix}{i}",
            "image_base64": encode_png_base64(ds.images[i]),
            "metadata": {"label": int(ds.labels[i])},
        }
        for i in indices
    ]
