# One image, one entrypoint: `dlqproc` (default command `run`).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dlqproc ./dlqproc
COPY schema ./schema
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
COPY conf /etc/dlqproc
RUN useradd --system --no-create-home dlqproc
USER dlqproc
# Health, readiness and metrics (server.port).
EXPOSE 8080
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["dlqproc"]
CMD ["--config", "/etc/dlqproc/default.yaml", "run"]
