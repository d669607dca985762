"""``beacon-llm serve`` scaled out on Ray Serve: N replicas of the app of :func:`beacon_llm.serve.create_app` behind
Ray's HTTP proxy, sharing one on-disk store of condensed books.

Each replica is a Ray actor that loads the model once (from a name, folder or hub id: a loaded model cannot be sent
to a replica) and runs the unchanged FastAPI app, so the routes, request checks, errors and streams are those of
``beacon-llm serve``. Every replica reads and writes the same ``store_dir``: a document one replica condensed is found
on disk by the others (files are written atomically; each lookup lists the folder). Every response carries the
headers ``x-beacon-replica`` (Ray's replica id) and ``x-beacon-pid``. Needs the ``ray`` extra
(``pip install -e ".[ray]"``); see docs/serve.md, "Scaling out on Ray Serve".

    serve run beacon_llm.serve_ray:app                                   # embedded model, 2 replicas, port 8000
    serve run beacon_llm.serve_ray:build_app num_replicas=4 store_dir=/srv/beacon-books model=path/to/model
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from .serve import ServeLimits, create_app, default_store_dir, read_api_keys

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "BeaconLLM"
APP_NAME = "beacon-llm"
REPLICA_HEADER = "x-beacon-replica"
PID_HEADER = "x-beacon-pid"


class _ReplicaHeaders:
    """Pure ASGI middleware (streams and disconnects pass untouched) that adds the replica's id and pid to every
    response's headers."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.headers = [(REPLICA_HEADER.encode(), replica.encode()), (PID_HEADER.encode(), str(os.getpid()).encode())]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (e.g. the app built directly in a test): the pid alone
        return f"pid-{os.getpid()}"


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class BeaconDeployment:
    """One replica: the model loaded once and the app of :func:`create_app` over it (built when the replica starts,
    in ``__serve_build_asgi_app__``). The arguments are those of :func:`create_app`, plain values only."""

    def __init__(
        self,
        model: str | None = None,
        *,
        adapter: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        beacon_overrides: Mapping[str, Any] | None = None,
        model_name: str | None = None,
        api_keys: Iterable[str] = (),
        store_dir: str | None = None,
        limits: Mapping[str, Any] | None = None,
        threads: int | None = None,
    ) -> None:
        self.model, self.adapter, self.dtype, self.device = model, adapter, dtype, device
        self.beacon_overrides = dict(beacon_overrides or {})
        self.model_name, self.api_keys, self.store_dir = model_name, list(api_keys), store_dir
        self.limits = ServeLimits(**dict(limits or {}))
        self.threads = threads

    async def __serve_build_asgi_app__(self) -> FastAPI:
        """Load the model (in a thread: the replica's event loop stays free) and build the app."""
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        app = await asyncio.to_thread(
            create_app,
            self.model,
            adapter=self.adapter,
            dtype=self.dtype,
            device=self.device,
            beacon_overrides=self.beacon_overrides,
            model_name=self.model_name,
            api_keys=self.api_keys,
            store_dir=self.store_dir,
            limits=self.limits,
        )
        replica = _replica_id()
        app.add_middleware(_ReplicaHeaders, replica=replica)
        logger.info("replica %s (pid %d) serves %r", replica, os.getpid(), app.state.server.model_name)
        return app


def application(
    model: str | None = None,
    *,
    adapter: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    beacon_overrides: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    api_keys: Iterable[str] = (),
    store_dir: str | os.PathLike[str] | None = None,
    limits: ServeLimits | None = None,
    threads: int | None = None,
    num_replicas: int = 2,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_ongoing_requests: int | None = None,
    **deployment_options: Any,
) -> serve.Application:
    """The Ray Serve application: ``num_replicas`` replicas of the app of :func:`create_app` sharing ``store_dir``.

    Args:
        model, adapter, dtype, device, beacon_overrides, model_name, api_keys, limits: as for :func:`create_app`;
            ``model`` must be a name, folder or hub id that every replica can load (one machine, or a shared path).
        store_dir: the store every replica shares (default: :func:`default_store_dir` of the driver), made absolute;
            on several machines it must be a shared file system.
        threads: torch threads per replica (default: Ray's, one per CPU of ``num_cpus``).
        num_replicas, num_cpus, num_gpus: replicas and the resources each one reserves.
        max_ongoing_requests: requests Ray sends to one replica at once (default ``limits.max_concurrent``: a busy
            replica's requests wait in Ray's queue, where a free replica can take them).
        deployment_options: more ``serve.deployment`` options (e.g. ``autoscaling_config``).
    """
    limits = limits or ServeLimits()
    store = Path(store_dir).expanduser().resolve() if store_dir else default_store_dir()
    options: dict[str, Any] = {
        "num_replicas": num_replicas,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "max_ongoing_requests": max_ongoing_requests or limits.max_concurrent,
        "graceful_shutdown_timeout_s": limits.shutdown_timeout,
        **deployment_options,
    }
    if "autoscaling_config" in deployment_options:
        options.pop("num_replicas")
    return BeaconDeployment.options(**options).bind(
        model,
        adapter=adapter,
        dtype=dtype,
        device=device,
        beacon_overrides=dict(beacon_overrides or {}),
        model_name=model_name,
        api_keys=list(api_keys),
        store_dir=str(store),
        limits=asdict(limits),
        threads=threads,
    )


_FLOAT_ARGS = {"num_cpus", "num_gpus", "shutdown_timeout"}
_INT_ARGS = {"num_replicas", "threads", "max_ongoing_requests", *ServeLimits.__dataclass_fields__} - _FLOAT_ARGS
_BEACON_ARGS = {"ratio_mix": "beacon_ratio_mix", "window": "beacon_window", "ratio": "beacon_ratio"}


def _number(name: str, value: Any, kind: type) -> Any:
    """``value`` (a ``key=value`` argument's text) as an int or float; a ValueError naming the key otherwise."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{name}={value!r} must be {what}") from None


def build_app(args: Mapping[str, Any]) -> serve.Application:
    """The application builder for ``serve run beacon_llm.serve_ray:build_app key=value ...`` (or a Serve config
    file's ``args``): the keywords of :func:`application`, the fields of :class:`ServeLimits` (e.g.
    ``max_concurrent=2``), ``ratio_mix`` / ``window`` / ``ratio`` (comma-separated) as ``beacon-llm serve`` takes
    them, ``api_keys`` (comma-separated) and ``api_keys_file``."""
    args = dict(args)
    for name in list(args):
        value = args[name]
        if isinstance(value, str) and name in _INT_ARGS:
            args[name] = _number(name, value, int)
        elif isinstance(value, str) and name in _FLOAT_ARGS:
            args[name] = _number(name, value, float)
    overrides = dict(args.pop("beacon_overrides", None) or {})
    for name, key in _BEACON_ARGS.items():
        if name in args:
            value = args.pop(name)
            if name == "ratio":
                parts = (
                    value.split(",")
                    if isinstance(value, str)
                    else list(value)
                    if isinstance(value, (list, tuple))
                    else [value]
                )
                value = [_number(name, r, int) if isinstance(r, str) else r for r in parts]  # others: as given
            elif name == "window" and isinstance(value, str):  # other values as given: the beacon config checks them
                value = _number(name, value, int)
            overrides[key] = value
    keys = args.pop("api_keys", ())
    keys = keys.split(",") if isinstance(keys, str) else list(keys)
    args["api_keys"] = read_api_keys(keys, args.pop("api_keys_file", None))
    limit_fields = {f: args.pop(f) for f in list(args) if f in ServeLimits.__dataclass_fields__}
    if limit_fields:
        args["limits"] = ServeLimits(**limit_fields)
    return application(beacon_overrides=overrides, **args)


def deploy(
    model: str | None = None,
    *,
    name: str = APP_NAME,
    route_prefix: str = "/",
    host: str = "127.0.0.1",
    port: int = 8000,
    blocking: bool = False,
    **kwargs: Any,
) -> DeploymentHandle:
    """Start Serve (its HTTP proxy on ``host:port``; Ray itself is started locally unless ``ray.init`` ran first)
    and deploy :func:`application` (``kwargs``: its arguments). Returns when every replica has loaded the model
    (or never, with ``blocking``); the OpenAI API is then at ``http://HOST:PORT{route_prefix}v1``."""
    serve.start(http_options={"host": host, "port": port})
    return serve.run(application(model, **kwargs), name=name, route_prefix=route_prefix, blocking=blocking)


app = build_app({})  # ``serve run beacon_llm.serve_ray:app``: the embedded model, 2 replicas, the default store

__all__ = ["BeaconDeployment", "PID_HEADER", "REPLICA_HEADER", "app", "application", "build_app", "deploy"]
