"""The same server scaled out as Ray Serve replicas: `python -m serve.cluster --replicas N ...`; Ray places,
restarts and routes them, keeping requests for an adapter on a replica that has it loaded."""
