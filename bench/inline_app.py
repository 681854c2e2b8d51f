"""The references `make bench` compares hueyserve with: what users write without a queue.

`POST /predict` calls the diabetes model inline, in the request (a plain `def`, so FastAPI runs
it in its threadpool off the event loop; run with `uvicorn --workers 2`, as a user would on a
2-core machine); `POST /constant` returns a constant (the ceiling of any FastAPI endpoint, for
cache hits). The model comes from HUEYSERVE_MODEL_DIR, as hueyserve's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel

from hueyserve.settings import settings
from hueyserve.worker.store import ModelStore

store = ModelStore(settings.model_dir)
model = store.load("diabetes", store.latest("diabetes") or "1")
app = FastAPI(title="inline reference")


class Instances(BaseModel):
    instances: list[list[float]]


@app.post("/predict")
def predict(body: Instances) -> dict[str, Any]:
    return {"predictions": model.predict(np.asarray(body.instances)).tolist()}


@app.post("/constant")
async def constant() -> dict[str, Any]:  # async: no threadpool hop, the fastest it gets
    return {"predictions": [151.0]}
