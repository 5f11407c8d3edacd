"""Field deployment: fleet certificates, the Docker fleet tool, container entry point."""
