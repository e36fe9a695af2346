"""The HTTP face: Litestar app, controllers, streamed uploads and downloads, web UI; the only place Litestar is used."""
