FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY feed ./feed
COPY streaming ./streaming
RUN pip install --no-cache-dir .
ENTRYPOINT ["oddsfeed"]
