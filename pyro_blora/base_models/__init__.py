"""Base Whisper models: bundled short names, local folders and Hub ids, and the CTranslate2 conversion both ways."""
