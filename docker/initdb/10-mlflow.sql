-- MLflow keeps its runs in its own database beside the Optuna one.
CREATE DATABASE mlflow OWNER ssa;
