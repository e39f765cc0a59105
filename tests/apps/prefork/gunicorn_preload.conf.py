"""gunicorn settings for wsgi_app.py. Nothing here is for heksher_shm: it needs no server hooks.

HEKSHER_URL=http://localhost:8888 gunicorn --config gunicorn_preload.conf.py wsgi_app:app
"""

bind = "127.0.0.1:8000"
workers = 4
worker_class = "sync"  # "gthread" works the same way
# The arbiter imports the app, so its client leads: a leader that is never
# recycled, whatever max_requests does to the workers.
preload_app = True
max_requests = 1000
max_requests_jitter = 100
graceful_timeout = 10
