"""Operations around the model: the MLflow registry and its served pyfunc, tracking, object storage,
Kubernetes Jobs, preflight checks and credential redaction.

``registry`` and ``serving`` package and serve a trained generator; ``kube`` and ``preflight`` are
what the Prefect flow calls before and around training. ``tracking``, ``storage`` and ``redact`` are
small services that training and evaluation use too; none of these modules imports ``galip.cli``.
"""
