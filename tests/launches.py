"""Counting the Pallas kernels a traced step launches (each layer's jit call counted again)."""

from __future__ import annotations

import jax
import jax.extend.core


def pallas_launches(closed_jaxpr, name: str) -> int:
    """How many ``pallas_call`` launches named ``name`` the jaxpr makes, its sub-jaxprs' (a layer's jit, a scan's
    body) counted at every call."""

    def count(jaxpr) -> int:
        found = 0
        for eqn in jaxpr.eqns:
            label = str(eqn.params.get("name_and_src_info", eqn.params.get("name")))
            found += eqn.primitive.name == "pallas_call" and name in label
            found += sum(count(sub.jaxpr if hasattr(sub, "jaxpr") else sub)
                         for sub in jax.extend.core.jaxprs_in_params(eqn.params))
        return found

    return count(closed_jaxpr.jaxpr)
