"""Fit on a Globus Compute (formerly funcX) endpoint: ``executor="funcx"`` or ``"globus-compute"``.

The two sides are kept apart, as in Parsl's ``high_throughput`` package:

* the client side, in the scan's process: :mod:`~pyhf_dist.executors.funcx.executor`
  (:class:`~pyhf_dist.executors.funcx.executor.FuncXExecutor`) and
  :mod:`~pyhf_dist.executors.funcx.transport` (login check, serialization, request sizes, result
  polling), both needing ``globus-compute-sdk`` (extra ``funcx``);
* the endpoint side: :mod:`~pyhf_dist.executors.funcx.endpoint`, the self-contained function the
  endpoint runs for each patch (shipped as source text; it needs only pyhf there).

Importing this package imports neither side.
"""
