"""credproxy: a credential broker for AI-agent sandboxes."""
