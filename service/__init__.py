"""The geoloc service: pipeline, HTTP app, persistence and CLI."""
