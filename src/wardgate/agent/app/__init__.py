"""Application access: the app service (HTTP and TCP apps behind the proxy) and its agent."""
