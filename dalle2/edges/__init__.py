"""The library's edges: what talks to users, MLflow and ZenML (the `dalle2` command, the
served pyfunc model and the registry, run lookup, what a run records and reproduction).

The core (the rest of dalle2) imports neither mlflow nor zenml and never imports from here;
import-linter checks both (pyproject.toml, [tool.importlinter])."""
