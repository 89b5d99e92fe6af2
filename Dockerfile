# One image for web, worker, beat, watcher (and xapisim in the demo profile).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY requirements.lock .
RUN pip install --requirement requirements.lock
COPY . .
RUN DEBUG=1 EAC_VAR_DIR=/tmp/eac python manage.py collectstatic --noinput
RUN useradd --system eac && mkdir -p /app/var && chown eac /app/var
USER eac
EXPOSE 8000
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "console.asgi:application"]
