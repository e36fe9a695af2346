"""Pick the PostgreSQL and S3 client libraries by measurement (run by hand against running servers).

    python bench/clients.py --pg postgresql:///postgres?host=/tmp/pg --s3 http://127.0.0.1:8333 --bucket b
(S3 credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import time

MiB = 1024 * 1024


async def pg_asyncpg(url: str, n: int) -> float:
    import asyncpg

    conn = await asyncpg.connect(url)
    await conn.execute("DROP TABLE IF EXISTS bench_clients; CREATE TABLE bench_clients (id serial PRIMARY KEY, v text)")
    times = []
    for i in range(n):
        t = time.perf_counter()
        row = await conn.fetchrow("INSERT INTO bench_clients (v) VALUES ($1) RETURNING id", str(i))
        await conn.fetchrow("SELECT * FROM bench_clients WHERE id = $1", row["id"])
        times.append(time.perf_counter() - t)
    await conn.close()
    return statistics.median(times) * 1000


async def pg_psycopg(url: str, n: int) -> float:
    import psycopg

    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await conn.execute("DROP TABLE IF EXISTS bench_clients")
    await conn.execute("CREATE TABLE bench_clients (id serial PRIMARY KEY, v text)")
    times = []
    for i in range(n):
        t = time.perf_counter()
        cur = await conn.execute("INSERT INTO bench_clients (v) VALUES (%s) RETURNING id", (str(i),))
        (ident,) = await cur.fetchone()  # type: ignore[misc]
        await (await conn.execute("SELECT * FROM bench_clients WHERE id = %s", (ident,))).fetchone()
        times.append(time.perf_counter() - t)
    await conn.close()
    return statistics.median(times) * 1000


async def _chunks(total: int, size: int = 4 * MiB):
    block = os.urandom(size)
    for _ in range(total // size):
        yield block


async def s3_obstore(endpoint: str, bucket: str, total: int) -> tuple[float, float]:
    import obstore
    from obstore.store import S3Store

    store = S3Store(bucket, endpoint=endpoint, client_options={"allow_http": True}, region="us-east-1")
    sha = hashlib.sha256()
    t = time.perf_counter()
    async with obstore.open_writer_async(store, "bench/obstore", buffer_size=16 * MiB) as writer:
        async for chunk in _chunks(total):
            await asyncio.to_thread(sha.update, chunk)
            await writer.write(chunk)
    up = total / MiB / (time.perf_counter() - t)
    sha = hashlib.sha256()
    t = time.perf_counter()
    result = await obstore.get_async(store, "bench/obstore")
    async for chunk in result.stream(min_chunk_size=4 * MiB):
        await asyncio.to_thread(sha.update, chunk)
    down = total / MiB / (time.perf_counter() - t)
    return up, down


async def s3_aiobotocore(endpoint: str, bucket: str, total: int) -> tuple[float, float]:
    from aiobotocore.session import get_session

    async with get_session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1") as s3:
        sha = hashlib.sha256()
        t = time.perf_counter()
        mpu = await s3.create_multipart_upload(Bucket=bucket, Key="bench/botocore")
        parts, buffer, number = [], b"", 1
        async for chunk in _chunks(total):
            await asyncio.to_thread(sha.update, chunk)
            buffer += chunk
            if len(buffer) >= 16 * MiB:
                r = await s3.upload_part(Bucket=bucket, Key="bench/botocore", UploadId=mpu["UploadId"],
                                         PartNumber=number, Body=buffer)
                parts.append({"ETag": r["ETag"], "PartNumber": number})
                buffer, number = b"", number + 1
        if buffer:
            r = await s3.upload_part(Bucket=bucket, Key="bench/botocore", UploadId=mpu["UploadId"],
                                     PartNumber=number, Body=buffer)
            parts.append({"ETag": r["ETag"], "PartNumber": number})
        await s3.complete_multipart_upload(Bucket=bucket, Key="bench/botocore", UploadId=mpu["UploadId"],
                                           MultipartUpload={"Parts": parts})
        up = total / MiB / (time.perf_counter() - t)
        sha = hashlib.sha256()
        t = time.perf_counter()
        obj = await s3.get_object(Bucket=bucket, Key="bench/botocore")
        async for chunk in obj["Body"].iter_chunks(4 * MiB):
            await asyncio.to_thread(sha.update, chunk)
        down = total / MiB / (time.perf_counter() - t)
    return up, down


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pg", required=True)
    parser.add_argument("--s3", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    print(f"asyncpg  insert+select p50 {await pg_asyncpg(args.pg, 2000):.3f} ms")
    print(f"psycopg3 insert+select p50 {await pg_psycopg(args.pg, 2000):.3f} ms")
    for name, fn in (("obstore", s3_obstore), ("aiobotocore", s3_aiobotocore)):
        up, down = await fn(args.s3, args.bucket, args.mib * MiB)
        print(f"{name:<12} {args.mib} MiB with sha256: up {up:.0f} MiB/s, down {down:.0f} MiB/s")


if __name__ == "__main__":
    asyncio.run(main())
