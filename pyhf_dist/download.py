"""Pallets from HEPData: a DOI or URL downloaded into a temporary folder, read, then removed.

HEPData serves a record's resource at its DOI (``10.17182/hepdata.90607.v3/r3``) by content
negotiation: asked for an archive (``Accept: application/x-tar, application/zip``, as
``pyhf.contrib.utils.download`` asks), doi.org forwards to HEPData and HEPData sends the
``.tar.gz`` itself. Only HEPData and doi.org are trusted unless ``force_download``. The archive is
read by pyhf-dist's own reader (:mod:`pyhf_dist.pallet`), as a local tarball would be, and nothing
of the download is left behind. A server that cannot be reached, or that stops answering, fails
in one line (:class:`~pyhf_dist.exceptions.DownloadError`) within :data:`TIMEOUT` seconds instead
of hanging.

>>> is_remote("10.17182/hepdata.90607.v3/r3"), url_of("doi:10.17182/hepdata.90607.v3/r3")
(True, 'https://doi.org/10.17182/hepdata.90607.v3/r3')
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import urllib.parse
import zipfile
from pathlib import Path
from typing import Iterator

from pyhf_dist.exceptions import DownloadError, MissingDependencyError, PalletError
from pyhf_dist.protocol import first_line

__all__ = ["HOSTS", "TIMEOUT", "downloaded", "is_remote", "url_of"]

#: The hosts a pallet is downloaded from without ``force_download`` (as pyhf's download).
HOSTS = ("www.hepdata.net", "doi.org")
#: Seconds to connect, and to wait for each part of the answer.
TIMEOUT = (15.0, 60.0)

_DOI = re.compile(r"^(doi:)?10\.\d{4,9}/\S+$", re.IGNORECASE)
_CHUNK = 1 << 20


def is_remote(source: str) -> bool:
    """Whether ``source`` is a URL or a DOI (rather than a path)."""
    return source.startswith(("http://", "https://")) or bool(_DOI.match(source))


def url_of(source: str) -> str:
    """The URL of a DOI (``doi:`` prefix or none) or URL."""
    if _DOI.match(source):
        return "https://doi.org/" + re.sub(r"^doi:", "", source, flags=re.IGNORECASE)
    return source


@contextlib.contextmanager
def downloaded(source: str, force: bool = False) -> Iterator[Path]:
    """Download the pallet at ``source`` (a DOI or URL); yields the archive, a ``.tar.gz`` file (or
    the folder a ``.zip`` unpacks into), removed when the block ends.

    Raises:
        PalletError: A host other than HEPData's without ``force``, an answer other than 200 OK
            (a DOI HEPData does not know), or what came is no archive.
        DownloadError: The server cannot be reached or stops answering.
        MissingDependencyError: ``requests`` is not installed (the ``contrib`` extra).
    """
    try:
        import requests
    except ImportError:
        raise MissingDependencyError("requests", "contrib", "downloading a pallet") from None
    url = url_of(source)
    host = urllib.parse.urlsplit(url).hostname
    if not force and host not in HOSTS:
        raise PalletError(f"{source}: {host} is not HEPData's ({', '.join(HOSTS)}): download the archive and give "
                          "its path, or read it with pyhf_dist.load_pallet(..., force_download=True)")
    folder = Path(tempfile.mkdtemp(prefix="pyhf-dist-pallet-"))
    try:
        archive = folder / "pallet.tar.gz"
        try:
            with requests.get(url, headers={"Accept": "application/x-tar, application/zip"}, timeout=TIMEOUT,
                              stream=True) as response:
                if response.status_code != 200:
                    raise PalletError(f"could not download the pallet {source}: {host} answers HTTP "
                                      f"{response.status_code} {response.reason}: check the DOI or URL")
                with open(archive, "wb") as stream:
                    for part in response.iter_content(_CHUNK):
                        stream.write(part)
        except requests.exceptions.RequestException as error:
            raise DownloadError(f"could not download the pallet {source}: {host} {_unreachable(error)}: check the "
                                "network (or its proxy), or download the pallet's .tar.gz where you can and give "
                                "its path") from None
        except OSError as error:
            raise PalletError(f"could not download the pallet {source}: cannot write {archive}: "
                              f"{first_line(error)}") from None
        yield _unpacked(archive) if zipfile.is_zipfile(archive) else archive
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _unreachable(error: Exception) -> str:
    import requests

    if isinstance(error, requests.exceptions.Timeout):
        return "did not answer in time"
    if isinstance(error, requests.exceptions.ConnectionError):
        text = str(error)
        if "NameResolution" in text or "resolve" in text:
            return "cannot be found (its name does not resolve)"
        return "cannot be reached"
    return f"failed ({first_line(error)})"


def _unpacked(archive: Path) -> Path:
    """A ``.zip`` pallet, unpacked beside it (pyhf's download takes both forms)."""
    folder = archive.parent / "pallet"
    try:
        with zipfile.ZipFile(archive) as packed:
            for member in packed.infolist():
                target = (folder / member.filename).resolve()
                if not target.is_relative_to(folder.resolve()):  # a name like ../x leaves the folder
                    raise PalletError(f"the downloaded archive holds {member.filename!r}, outside its folder")
            packed.extractall(folder)
    except zipfile.BadZipFile as error:
        raise PalletError(f"the downloaded archive is not a readable zip file ({first_line(error)})") from None
    return folder
