from fastapi.testclient import TestClient

from tests.helpers import register


def test_register_and_whoami(client: TestClient) -> None:
    account = register(client)
    response = client.get("/v1/accounts/whoami", headers=account.auth)
    assert response.status_code == 200
    body = response.json()
    assert body["uuid"] == account.aci
    assert body["number"] == account.number
    assert body["pni"] == account.pni
    assert account.extra["response"]["reregistration"] is False
