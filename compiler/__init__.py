"""The compiler stages: frontend -> schedule -> liveness -> planner -> codegen (see compiler/README.md)."""
